#include "orchestrator/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/flags.h"

namespace aha {
namespace fs = std::filesystem;

std::string SvgLineChart(const std::string& title, const std::vector<double>& x,
                         const std::vector<std::pair<std::string, std::vector<double>>>& series) {
  const double W = 420, H = 240, L = 52, R = 12, T = 28, B = 34;
  double x0 = x.empty() ? 0 : x.front(), x1 = x.empty() ? 1 : x.back();
  double y0 = INFINITY, y1 = -INFINITY;
  for (const auto& [name, ys] : series)
    for (double y : ys)
      if (std::isfinite(y)) y0 = std::min(y0, y), y1 = std::max(y1, y);
  if (!std::isfinite(y0)) y0 = 0, y1 = 1;
  if (y1 - y0 < 1e-12) y0 -= 0.5, y1 += 0.5;
  if (x1 - x0 < 1e-12) x1 = x0 + 1;
  auto px = [&](double v) { return L + (v - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double v) { return H - B - (v - y0) / (y1 - y0) * (H - T - B); };
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd"};
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H << "' font-family='sans-serif' font-size='11'>"
    << "<rect width='100%' height='100%' fill='white'/>"
    << "<text x='" << W / 2 << "' y='16' text-anchor='middle' font-size='13'>" << title << "</text>"
    << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B << "' stroke='#888'/>"
    << "<line x1='" << L << "' y1='" << T << "' x2='" << L << "' y2='" << H - B << "' stroke='#888'/>";
  char buf[64];
  for (int i = 0; i <= 4; ++i) {
    double v = y0 + (y1 - y0) * i / 4;
    std::snprintf(buf, sizeof(buf), "%.3g", v);
    s << "<text x='" << L - 4 << "' y='" << py(v) + 4 << "' text-anchor='end'>" << buf << "</text>"
      << "<line x1='" << L << "' y1='" << py(v) << "' x2='" << W - R << "' y2='" << py(v) << "' stroke='#eee'/>";
  }
  std::snprintf(buf, sizeof(buf), "%.0f", x0);
  s << "<text x='" << L << "' y='" << H - B + 14 << "' text-anchor='middle'>" << buf << "</text>";
  std::snprintf(buf, sizeof(buf), "%.0f", x1);
  s << "<text x='" << W - R << "' y='" << H - B + 14 << "' text-anchor='middle'>" << buf << "</text>"
    << "<text x='" << (L + W - R) / 2 << "' y='" << H - 6 << "' text-anchor='middle'>step</text>";
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& ys = series[k].second;
    s << "<polyline fill='none' stroke-width='1.8' stroke='" << colors[k % 4] << "' points='";
    for (size_t i = 0; i < ys.size() && i < x.size(); ++i)
      if (std::isfinite(ys[i])) s << px(x[i]) << "," << py(ys[i]) << " ";
    s << "'/>";
    if (series.size() > 1)
      s << "<text x='" << W - R - 4 << "' y='" << T + 12 + 13 * k << "' text-anchor='end' fill='" << colors[k % 4] << "'>"
        << series[k].first << "</text>";
  }
  s << "</svg>";
  return s.str();
}

namespace {

nlohmann::json ReadJson(const fs::path& p) {
  std::ifstream f(p);
  if (!f) return nullptr;
  auto j = nlohmann::json::parse(f, nullptr, false);
  return j.is_discarded() ? nlohmann::json(nullptr) : j;
}

}  // namespace

int RunReportCommand(int argc, char** argv) {
  std::string run_dir;
  FlagSet flags("aha report", "Writes RUN_DIR/report/index.html (plots and tables) and prints a summary.");
  flags.Positional("RUN_DIR", &run_dir, "the run directory", true);
  ParseOrExit(flags, argc, argv);
  fs::path run(run_dir);
  if (!fs::is_directory(run)) return Fail("aha report", run_dir + " is not a directory");
  std::vector<nlohmann::json> rows;
  {
    std::ifstream f(run / "metrics" / "learner.jsonl");
    int n = 0;
    for (std::string line; std::getline(f, line);) {
      ++n;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.contains("step")) rows.push_back(j);
    }
  }
  auto col = [&](const char* key) {
    std::vector<double> v;
    for (const auto& r : rows) v.push_back(r.contains(key) && r[key].is_number() ? r[key].get<double>() : NAN);
    return v;
  };
  std::vector<double> steps = col("step");
  // Short moving average so the noise of small batches does not hide the trend.
  auto smooth = [](std::vector<double> v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      double s = 0;
      int n = 0;
      for (size_t j = i >= 4 ? i - 4 : 0; j <= i; ++j)
        if (std::isfinite(v[j])) s += v[j], ++n;
      out[i] = n ? s / n : NAN;
    }
    return out;
  };
  std::ostringstream html;
  html << "<!doctype html><html><head><meta charset='utf-8'><title>aha run report</title>"
       << "<style>body{font-family:sans-serif;margin:24px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px}"
       << ".charts{display:flex;flex-wrap:wrap;gap:12px}</style></head><body>"
       << "<h1>aha run report</h1><p>" << fs::absolute(run).string() << "</p>";
  std::ostringstream summary;
  auto before = ReadJson(run / "eval" / "before.json"), after = ReadJson(run / "eval" / "after.json");
  if (before.is_object() && after.is_object()) {
    html << "<h2>Evaluation (held-out)</h2><table><tr><th>kind</th><th>model</th><th>pass@1</th><th>cons@"
         << after.value("samples", 0) << "</th><th>mean length</th></tr>";
    summary << "evaluation on " << after.value("data", std::string("?")) << " (" << after.value("samples", 0) << " samples)\n";
    char line[256];
    std::snprintf(line, sizeof(line), "%-10s %-7s %8s %8s %12s\n", "kind", "model", "pass@1", "cons@k", "mean length");
    summary << line;
    for (auto& [kind, a] : after["kinds"].items()) {
      for (const auto& [label, j] : {std::pair<std::string, nlohmann::json>{"before", before}, {"after", after}}) {
        if (!j["kinds"].contains(kind)) continue;
        auto k = j["kinds"][kind];
        html << "<tr><td>" << kind << "</td><td>" << label << "</td><td>" << k.value("pass@1", 0.0) << "</td><td>"
             << k.value("cons@k", 0.0) << "</td><td>" << k.value("mean_length", 0.0) << "</td></tr>";
        std::snprintf(line, sizeof(line), "%-10s %-7s %8.3f %8.3f %12.1f\n", kind.c_str(), label.c_str(), k.value("pass@1", 0.0),
                      k.value("cons@k", 0.0), k.value("mean_length", 0.0));
        summary << line;
      }
    }
    html << "</table>";
  }
  if (!rows.empty()) {
    html << "<h2>Training (" << rows.size() << " steps)</h2><div class='charts'>";
    html << SvgLineChart("reward (mean, 5-step average)", steps, {{"reward", smooth(col("reward"))}});
    html << SvgLineChart("accuracy", steps, {{"accuracy", smooth(col("accuracy"))}});
    html << SvgLineChart("response length (tokens)", steps, {{"length", smooth(col("length"))}});
    html << SvgLineChart("KL to reference", steps, {{"kl", col("kl")}});
    html << SvgLineChart("entropy", steps, {{"entropy", col("entropy")}});
    html << SvgLineChart("clip fraction", steps, {{"low", col("clip_low")}, {"high", col("clip_high")}});
    html << SvgLineChart("learner tokens/s", steps, {{"tokens/s", col("tokens_per_s")}});
    html << SvgLineChart("step time split (s)", steps,
                         {{"wait", col("wait_s")}, {"forward", col("forward_s")}, {"backward", col("backward_s")}, {"optimizer", col("optimizer_s")}});
    html << "</div>";
    const auto& last = rows.back();
    char line[256];
    std::snprintf(line, sizeof(line), "grpo: %zu steps, last reward %.3f, accuracy %.3f, length %.1f, loss %.4f\n", rows.size(),
                  last.value("reward", 0.0), last.value("accuracy", 0.0), last.value("length", 0.0), last.value("loss", 0.0));
    summary << line;
  }
  html << "</body></html>\n";
  fs::create_directories(run / "report");
  std::ofstream(run / "report" / "index.html") << html.str();
  std::ofstream(run / "report" / "summary.txt") << summary.str();
  std::printf("%sreport: %s\n", summary.str().c_str(), (run / "report" / "index.html").string().c_str());
  return 0;
}

}  // namespace aha
