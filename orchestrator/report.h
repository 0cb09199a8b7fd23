// `aha report RUN_DIR`: an HTML page (RUN_DIR/report/index.html) with SVG plots of reward,
// accuracy, response length, KL, entropy, clip fraction and throughput over steps (from
// metrics/learner.jsonl), the before/after evaluation table (eval/before.json, eval/after.json),
// and a short terminal summary (also RUN_DIR/report/summary.txt).
#pragma once

#include <string>
#include <vector>

namespace aha {

int RunReportCommand(int argc, char** argv);

// One line chart as an SVG element: `series` are (name, y values) over x = step.
std::string SvgLineChart(const std::string& title, const std::vector<double>& x,
                         const std::vector<std::pair<std::string, std::vector<double>>>& series);

}  // namespace aha
