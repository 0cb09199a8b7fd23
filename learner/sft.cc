#include "learner/sft.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "engine/optimizer.h"
#include "engine/tokenizer/prompt_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/transformer.h"

namespace aha {
namespace fs = std::filesystem;

Result<std::vector<SftExample>> LoadSftData(const std::string& path, const std::string& model_dir,
                                            const std::string& prompt_template) {
  ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(model_dir));
  ASSIGN_OR_RETURN(auto tmpl, tokenizer::PromptTemplate::Parse(prompt_template));
  std::ifstream f(path);
  if (!f) return NotFound(path + ": cannot open");
  std::vector<SftExample> out;
  std::string line;
  for (int64_t n = 1; std::getline(f, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    std::string where = path + ":" + std::to_string(n);
    if (j.is_discarded() || !j.is_object()) return InvalidArgument(where + ": not a JSON object");
    for (const char* k : {"prompt", "completion"})
      if (!j.contains(k) || !j[k].is_string()) return InvalidArgument(where + ": field '" + k + "': missing or not a string");
    SftExample e;
    e.prompt = tok->Encode(tmpl.Render(j["prompt"].get<std::string>()), false);
    e.completion = tok->Encode(j["completion"].get<std::string>(), false);
    if (tok->eos_id() >= 0) e.completion.push_back(tok->eos_id());  // learn to stop
    if (e.prompt.empty() || e.completion.empty()) return InvalidArgument(where + ": empty prompt or completion");
    out.push_back(std::move(e));
  }
  if (out.empty()) return InvalidArgument(path + ": no examples");
  return out;
}

Result<double> RunSft(const SftOptions& o, const std::vector<SftExample>& data, engine::Backend* backend) {
  ASSIGN_OR_RETURN(auto model, engine::Transformer::Load(o.model_dir, backend));
  engine::AdamWOptions adam;
  adam.lr = static_cast<float>(o.sft.lr);
  adam.weight_decay = 0.0f;
  engine::AdamW opt(model.get(), adam);
  const int64_t B = o.sft.batch_sequences;
  const int64_t steps_per_epoch = (static_cast<int64_t>(data.size()) + B - 1) / B;
  const int64_t total = steps_per_epoch * o.sft.epochs;
  std::mt19937_64 rng(o.seed);
  std::vector<size_t> order(data.size());
  double epoch_loss = 0;
  int64_t step = 0;
  std::vector<int32_t> tokens, cu;
  std::vector<float> lp, ent, dlp;
  for (int64_t epoch = 0; epoch < o.sft.epochs; ++epoch) {
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    epoch_loss = 0;
    for (int64_t b = 0; b < steps_per_epoch; ++b) {
      tokens.clear();
      cu.assign(1, 0);
      std::vector<std::pair<size_t, size_t>> spans;  // completion [begin, end) in tokens
      std::vector<int32_t> score_from;                // prompt lengths: only completions are scored
      for (int64_t k = b * B; k < std::min<int64_t>((b + 1) * B, static_cast<int64_t>(data.size())); ++k) {
        const SftExample& e = data[order[static_cast<size_t>(k)]];
        tokens.insert(tokens.end(), e.prompt.begin(), e.prompt.end());
        score_from.push_back(static_cast<int32_t>(e.prompt.size()));
        size_t begin = tokens.size();
        tokens.insert(tokens.end(), e.completion.begin(), e.completion.end());
        spans.emplace_back(begin, tokens.size());
        cu.push_back(static_cast<int32_t>(tokens.size()));
      }
      const int N = static_cast<int>(tokens.size());
      lp.assign(N, 0.f);
      ent.assign(N, 0.f);
      model->Forward(tokens.data(), cu.data(), static_cast<int>(cu.size() - 1), N, 1.0f, lp.data(), ent.data(),
                     score_from.data());
      size_t count = 0;
      for (auto [s, e] : spans) count += e - s;
      dlp.assign(N, 0.f);
      double loss = 0;
      for (auto [s, e] : spans)
        for (size_t t = s; t < e; ++t) {
          loss -= lp[t];
          dlp[t] = -1.0f / static_cast<float>(count);
        }
      loss /= static_cast<double>(count);
      model->Backward(dlp.data(), nullptr);
      engine::ClipGradNorm(backend, model->grads(), model->num_params(), 1.0);
      ++step;
      double lr = o.sft.lr * (o.sft.warmup_steps > 0 ? std::min(1.0, double(step) / double(o.sft.warmup_steps)) : 1.0);
      opt.Step(static_cast<float>(lr));
      model->ZeroGrad();
      epoch_loss += loss / static_cast<double>(steps_per_epoch);
      if (o.on_step) o.on_step(step, total, loss);
    }
  }
  RETURN_IF_ERROR(model->Save(o.out_dir, engine::DType::kF32));
  std::error_code ec;
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    fs::path src = fs::path(o.model_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, fs::path(o.out_dir) / f, fs::copy_options::overwrite_existing, ec);
    if (ec) return IoError("cannot copy " + src.string() + ": " + ec.message());
  }
  return epoch_loss;
}

}  // namespace aha
