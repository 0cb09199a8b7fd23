// dashboards/ against a live run (label e2e): a real Prometheus server, configured with
// dashboards/prometheus.yml and dashboards/alerts.yml, scrapes a running `aha run` (configs/tiny-cpu.yaml
// shrunk with --set: GRPO only, two actors, short completions), and every query of the dashboards
// and of the alert rules is evaluated through its HTTP API (/api/v1/query).
//
// The rule, for every query q (a panel target's expr, or an alert's expr):
//   1. q evaluates without error;
//   2. every metric selector in q (aha_* or up, with its label matchers) returns at least one series;
//   3. panel queries only: q itself returns a non-empty result;
// and Prometheus has loaded every rule of alerts.yml and evaluates each without error.
// Alert expressions are not required to return data: they hold comparisons that are normally false
// (nothing is wrong), so an empty result is their healthy answer; rule 2 still proves each metric
// they watch exists under that name. Rule 2 is what makes a metric renamed in the daemons (or a
// typo in a dashboard) fail this test even inside `a or b` or a comparison. Grafana's
// $__rate_interval becomes 30s (four 1 s scrapes and more); no other template variable may be used.
//
// Targets reach Prometheus the documented way: dashboards/file_sd.sh writes file_sd files from the
// run's procs/*.ready files, read by the shipped prometheus.yml (its intervals set to 1 s here).
// The checks are repeated every 2 s until all pass at once (about 10 s into the run on 2 cores); the
// test fails when they still do not 60 s after every process is up, listing what is missing.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "tests/shell.h"

#if !defined(AHA_BIN_DIR) || !defined(AHA_SOURCE_DIR)
#error "AHA_BIN_DIR must name build/bin and AHA_SOURCE_DIR the source tree"
#endif

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

const fs::path kSource = AHA_SOURCE_DIR;
const char* kDashboards[] = {"training.json", "throughput.json", "health.json"};
constexpr const char* kRateInterval = "30s";

using aha::test::Output;
using aha::test::Sh;

std::string ReadFile(const fs::path& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

// Starts argv with stdout and stderr appended to `log`; returns the pid.
pid_t Spawn(const std::vector<std::string>& argv, const fs::path& log) {
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);  // its own group: teardown can reach whatever it leaves behind
    if (!freopen(log.c_str(), "a", stdout) || !freopen(log.c_str(), "a", stderr)) _exit(126);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// SIGTERM, then SIGKILL to the whole group after `grace`.
void Stop(pid_t pid, std::chrono::seconds grace) {
  if (pid <= 0) return;
  kill(pid, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, nullptr, WNOHANG) == pid) return;
    std::this_thread::sleep_for(100ms);
  }
  kill(-pid, SIGKILL);
  waitpid(pid, nullptr, 0);
}

// A query as it is sent: Grafana's interval variable replaced.
std::string Resolve(std::string expr) {
  const std::string var = "$__rate_interval";
  for (size_t at; (at = expr.find(var)) != std::string::npos;) expr.replace(at, var.size(), kRateInterval);
  return expr;
}

// Metric selectors of a PromQL expression: aha_* or up, with their {label matchers}.
std::set<std::string> Selectors(const std::string& expr) {
  static const std::regex re(R"((^|[^A-Za-z0-9_:$])((aha_[A-Za-z0-9_:]+|up)(\{[^}]*\})?))");
  std::set<std::string> out;
  for (auto it = std::sregex_iterator(expr.begin(), expr.end(), re); it != std::sregex_iterator(); ++it)
    out.insert((*it)[2]);
  return out;
}

struct Query {
  std::string where;  // "training.json: Reward [A]" or "alerts.yml: AhaActorDown"
  std::string expr;   // resolved
  bool panel = false;
};

// Every panel target of the dashboards and every alert rule.
std::vector<Query> AllQueries() {
  std::vector<Query> out;
  for (const char* name : kDashboards) {
    json d = json::parse(ReadFile(kSource / "dashboards" / name));
    for (const auto& p : d["panels"]) {
      if (!p.contains("targets")) continue;
      for (const auto& t : p["targets"])
        out.push_back({std::string(name) + ": " + p["title"].get<std::string>() + " [" + t["refId"].get<std::string>() + "]",
                       Resolve(t["expr"].get<std::string>()), true});
    }
  }
  YAML::Node rules = YAML::LoadFile((kSource / "dashboards" / "alerts.yml").string());
  for (const auto& g : rules["groups"])
    for (const auto& r : g["rules"])
      out.push_back({"alerts.yml: " + r["alert"].as<std::string>(), r["expr"].as<std::string>(), false});
  return out;
}

TEST(Dashboards, FilesImportIntoGrafanaAndPrometheusAcceptsTheConfig) {
  std::set<std::string> uids;
  for (const char* name : kDashboards) {
    SCOPED_TRACE(name);
    json d = json::parse(ReadFile(kSource / "dashboards" / name));
    ASSERT_TRUE(d["__inputs"].is_array());
    EXPECT_EQ(d["__inputs"][0]["name"], "DS_PROMETHEUS");
    EXPECT_EQ(d["__inputs"][0]["pluginId"], "prometheus");
    EXPECT_GE(d["schemaVersion"].get<int>(), 39);
    EXPECT_TRUE(d["id"].is_null()) << "an exported dashboard has no id, or import overwrites another";
    EXPECT_TRUE(uids.insert(d["uid"].get<std::string>()).second) << "uid reused";
    std::set<int> ids;
    int targets = 0;
    for (const auto& p : d["panels"]) {
      EXPECT_TRUE(ids.insert(p["id"].get<int>()).second) << "panel id reused: " << p["title"];
      if (p["type"] == "row") continue;
      EXPECT_EQ(p["datasource"]["uid"], "${DS_PROMETHEUS}") << p["title"];
      EXPECT_FALSE(p.value("description", "").empty()) << p["title"] << " says what it shows";
      std::set<std::string> refs;
      for (const auto& t : p["targets"]) {
        ++targets;
        EXPECT_EQ(t["datasource"]["uid"], "${DS_PROMETHEUS}") << p["title"];
        EXPECT_TRUE(refs.insert(t["refId"].get<std::string>()).second) << p["title"];
        std::string q = Resolve(t["expr"].get<std::string>());
        EXPECT_EQ(q.find('$'), std::string::npos) << p["title"] << ": only $__rate_interval may be used: " << q;
        EXPECT_FALSE(Selectors(q).empty()) << p["title"] << ": names no aha_ metric: " << q;
      }
    }
    EXPECT_GT(targets, 10);
  }
  // promtool checks the scrape config and the rule file it names (in a copy: promtool resolves
  // rule_files and file_sd paths relative to the config).
  fs::path dir = fs::temp_directory_path() / ("aha_dashboards_promtool_" + std::to_string(getpid()));
  fs::create_directories(dir);
  for (const char* f : {"prometheus.yml", "alerts.yml"})
    fs::copy_file(kSource / "dashboards" / f, dir / f, fs::copy_options::overwrite_existing);
  Output config = Sh("promtool check config " + (dir / "prometheus.yml").string() + " 2>&1");
  EXPECT_EQ(config.code, 0) << config.out << "(promtool comes with Debian's prometheus package: scripts/setup.sh)";
  Output rules = Sh("promtool check rules " + (kSource / "dashboards" / "alerts.yml").string() + " 2>&1");
  EXPECT_EQ(rules.code, 0) << rules.out;
  fs::remove_all(dir);
}

class LiveRun : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(Sh("command -v prometheus >/dev/null").code, 0)
        << "prometheus is not installed (Debian package prometheus, in scripts/setup.sh)";
    dir_ = fs::temp_directory_path() / ("aha_dashboards_test_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "prom" / "targets");  // before Prometheus starts: it watches the folder
  }
  void TearDown() override {
    Stop(run_, 60s);  // aha run stops its daemons in order
    Stop(prometheus_, 10s);
    if (!HasFailure()) fs::remove_all(dir_);
    else std::cerr << "kept " << dir_ << " (aha-run.out, run/logs, prom/prometheus.log)\n";
  }

  // The shipped config with 1 s intervals.
  void WritePrometheusConfig() {
    std::string config = ReadFile(kSource / "dashboards" / "prometheus.yml");
    for (const char* key : {"scrape_interval", "evaluation_interval"}) {
      std::regex re(std::string("(") + key + R"(:\s*)\d+[smh])");
      ASSERT_TRUE(std::regex_search(config, re)) << "dashboards/prometheus.yml has no " << key;
      config = std::regex_replace(config, re, "$011s");
    }
    std::ofstream(dir_ / "prom" / "prometheus.yml") << config;
    fs::copy_file(kSource / "dashboards" / "alerts.yml", dir_ / "prom" / "alerts.yml");
  }

  // GET /api/v1/<path> with form arguments; the parsed reply, or null when there was none.
  json Api(const std::string& path, const std::string& query = "") {
    std::string cmd = "curl -s --max-time 10 -G http://127.0.0.1:" + std::to_string(port_) + "/api/v1/" + path;
    if (!query.empty()) {
      fs::path qf = dir_ / "query.txt";
      std::ofstream(qf) << query;
      cmd += " --data-urlencode query@" + qf.string();
    }
    Output o = Sh(cmd);
    json j = json::parse(o.out, nullptr, false);
    return j.is_discarded() ? json() : j;
  }

  fs::path dir_;
  pid_t run_ = -1, prometheus_ = -1;
  int port_ = 0;
};

TEST_F(LiveRun, EveryPanelQueryAndAlertExpressionWorksOnLiveMetrics) {
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path run = dir_ / "run";
  // tiny-cpu without SFT and evaluation; more steps than the test needs, it is stopped when done.
  run_ = Spawn({std::string(AHA_BIN_DIR) + "/aha", "run", (kSource / "configs" / "tiny-cpu.yaml").string(),
                "--run-dir", run.string(), "--no-eval", "--set", "stages=[grpo]", "--set", "grpo.steps=100000",
                "--set", "grpo.group_size=4", "--set", "grpo.prompts_per_step=2", "--set", "grpo.max_new_tokens=16",
                "--set", "checkpoint.every=100000", "--set", "topology.actors=[{device: cpu}, {device: cpu}]"},
               dir_ / "aha-run.out");
  WritePrometheusConfig();
  port_ = FreePort();
  prometheus_ = Spawn({"prometheus", "--config.file=" + (dir_ / "prom" / "prometheus.yml").string(),
                       "--storage.tsdb.path=" + (dir_ / "prom" / "data").string(),
                       "--web.listen-address=127.0.0.1:" + std::to_string(port_), "--log.level=warn"},
                      dir_ / "prom" / "prometheus.log");

  const std::vector<Query> queries = AllQueries();
  std::set<std::string> selectors;
  for (const auto& q : queries)
    for (const auto& s : Selectors(q.expr)) selectors.insert(s);
  std::set<std::string> alert_names;
  for (const auto& q : queries)
    if (!q.panel) alert_names.insert(q.where.substr(q.where.find(": ") + 2));
  const std::set<std::string> roles = {"replay", "rewardd", "learner", "actor-0", "actor-1"};
  const std::string file_sd = (kSource / "dashboards" / "file_sd.sh").string() + " " + run.string() + " " +
                              (dir_ / "prom" / "targets").string() + " 2>&1";

  // Poll until every check passes at once: each pass proves the run has produced every series.
  // The run needs a few seconds to start; once every role is up, 60 s of 1 s scrapes are plenty.
  std::vector<std::string> failures = {"never checked: the run did not start"};
  auto deadline = t0 + 180s;
  bool all_up = false;
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(2s);
    int st = 0;
    if (waitpid(run_, &st, WNOHANG) == run_) {
      run_ = -1;
      FAIL() << "aha run exited early:\n" << Sh("tail -20 " + (dir_ / "aha-run.out").string()).out;
    }
    if (waitpid(prometheus_, &st, WNOHANG) == prometheus_) {
      prometheus_ = -1;
      FAIL() << "prometheus exited:\n" << ReadFile(dir_ / "prom" / "prometheus.log");
    }
    if (!fs::exists(run / "procs")) continue;
    Output sd = Sh(file_sd);
    ASSERT_EQ(sd.code, 0) << sd.out;
    failures.clear();
    // Every role is a target, and up.
    json up = Api("query", "up == 1");
    std::set<std::string> up_roles;
    if (up.value("status", "") == "success")
      for (const auto& r : up["data"]["result"]) up_roles.insert(r["metric"].value("role", ""));
    if (up_roles != roles) {
      failures.push_back("not every role is scraped and up yet (" + std::to_string(up_roles.size()) + " of 5)");
      continue;
    }
    if (!all_up) deadline = std::min(deadline, std::chrono::steady_clock::now() + 60s);
    all_up = true;
    for (const auto& s : selectors) {
      json r = Api("query", s);
      if (r.value("status", "") != "success" || r["data"]["result"].empty())
        failures.push_back("selector " + s + " returns no series");
    }
    for (const auto& q : queries) {
      json r = Api("query", q.expr);
      if (r.value("status", "") != "success")
        failures.push_back(q.where + ": error " + (r.is_null() ? "no reply" : r.value("error", "?")) + " in " + q.expr);
      else if (q.panel && r["data"]["result"].empty())
        failures.push_back(q.where + ": no data for " + q.expr);
    }
    // The rules were loaded from alerts.yml, all of them, and each evaluates cleanly.
    json rules = Api("rules");
    std::set<std::string> healthy;
    if (rules.value("status", "") == "success")
      for (const auto& g : rules["data"]["groups"])
        for (const auto& r : g["rules"])
          if (r["health"] == "ok") healthy.insert(r["name"].get<std::string>());
    if (healthy != alert_names)
      failures.push_back("Prometheus evaluates " + std::to_string(healthy.size()) + " of " +
                         std::to_string(alert_names.size()) + " alert rules cleanly");
    if (failures.empty()) break;
  }
  std::string report;
  for (const auto& f : failures) report += "  " + f + "\n";
  EXPECT_TRUE(failures.empty()) << failures.size() << " check(s) failed after "
                                << std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0).count()
                                << " s:\n" << report;
  int panels = 0;
  for (const auto& q : queries) panels += q.panel;
  std::cout << "checked " << panels << " panel queries, " << alert_names.size() << " alert expressions and "
            << selectors.size() << " metric selectors against the live run in "
            << std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - t0).count() << " s\n";
}

}  // namespace
