#include "replay/dataset.h"

#include <capnp/message.h>
#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "common/hash.h"
#include "replay/records.h"

namespace aha::replay {

using nlohmann::json;

namespace {

Status FieldError(std::string_view field, std::string_view why) {
  return InvalidArgument(fmt::format("field '{}': {}", field, why));
}

const char* TypeName(const json& j) { return j.type_name(); }

Result<std::string> RequiredString(const json& obj, const char* field, bool allow_number = false) {
  auto it = obj.find(field);
  if (it == obj.end()) return FieldError(field, "missing");
  if (it->is_string()) return it->get<std::string>();
  if (allow_number && it->is_number_integer()) return it->dump();
  return FieldError(field, fmt::format("expected a string, got {}", TypeName(*it)));
}

Result<proto::TaskKind> ParseKind(const std::string& kind) {
  if (kind == "math") return proto::TaskKind::MATH;
  if (kind == "countdown") return proto::TaskKind::COUNTDOWN;
  if (kind == "arith") return proto::TaskKind::ARITH;
  if (kind == "code") return proto::TaskKind::CODE;
  if (kind == "other") return proto::TaskKind::OTHER;
  return FieldError("kind", "'" + kind + "' is not one of math|countdown|arith|code|other");
}

}  // namespace

Status ParseTaskJson(std::string_view line, proto::Task::Builder out) {
  json j = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument("not valid JSON");
  if (!j.is_object()) return InvalidArgument(fmt::format("expected a JSON object, got {}", TypeName(j)));
  for (const auto& [key, value] : j.items()) {
    static const char* kKnown[] = {"id", "prompt", "answer", "kind", "tests", "language", "metadata"};
    bool known = false;
    for (const char* k : kKnown) known = known || key == k;
    if (!known) return FieldError(key, "unknown field (put extra data under 'metadata')");
  }
  ASSIGN_OR_RETURN(std::string id, RequiredString(j, "id", /*allow_number=*/true));
  if (id.empty()) return FieldError("id", "empty");
  ASSIGN_OR_RETURN(std::string prompt, RequiredString(j, "prompt"));
  if (prompt.empty()) return FieldError("prompt", "empty");
  ASSIGN_OR_RETURN(std::string kind_name, RequiredString(j, "kind"));
  ASSIGN_OR_RETURN(proto::TaskKind kind, ParseKind(kind_name));
  std::string answer;
  if (kind == proto::TaskKind::CODE && !j.contains("answer")) {
    answer = "";
  } else {
    ASSIGN_OR_RETURN(answer, RequiredString(j, "answer", /*allow_number=*/true));
  }

  out.setId(id);
  out.setKind(kind);
  out.setPrompt(prompt);
  out.setAnswer(answer);

  if (auto it = j.find("tests"); it != j.end()) {
    if (!it->is_array()) return FieldError("tests", fmt::format("expected an array, got {}", TypeName(*it)));
    auto tests = out.initTests(static_cast<unsigned>(it->size()));
    for (size_t i = 0; i < it->size(); ++i) {
      const json& t = (*it)[i];
      std::string where = fmt::format("tests[{}]", i);
      if (!t.is_object()) return FieldError(where, "expected an object with stdin and stdout");
      for (const char* f : {"stdin", "stdout"}) {
        auto ft = t.find(f);
        if (ft == t.end() || !ft->is_string())
          return FieldError(where + "." + f, ft == t.end() ? "missing" : "expected a string");
      }
      for (const auto& [key, value] : t.items())
        if (key != "stdin" && key != "stdout") return FieldError(where + "." + key, "unknown field");
      tests[i].setStdin(t["stdin"].get<std::string>());
      tests[i].setExpectedStdout(t["stdout"].get<std::string>());
    }
  }
  if (auto it = j.find("language"); it != j.end()) {
    if (!it->is_string()) return FieldError("language", "expected a string");
    out.setLanguage(it->get<std::string>());
  }
  if (auto it = j.find("metadata"); it != j.end()) {
    if (!it->is_object()) return FieldError("metadata", fmt::format("expected an object, got {}", TypeName(*it)));
    out.setMetadata(it->dump());
  }
  if (kind == proto::TaskKind::CODE && !j.contains("tests"))
    return FieldError("tests", "missing (code tasks need at least one test)");
  if (kind == proto::TaskKind::COUNTDOWN) {
    auto meta = j.find("metadata");
    if (meta == j.end()) return FieldError("metadata", "missing (countdown needs numbers and target)");
    auto numbers = meta->find("numbers");
    if (numbers == meta->end() || !numbers->is_array() || numbers->empty())
      return FieldError("metadata.numbers", "expected a non-empty array of integers");
    auto list = out.initNumbers(static_cast<unsigned>(numbers->size()));
    for (size_t i = 0; i < numbers->size(); ++i) {
      if (!(*numbers)[i].is_number_integer())
        return FieldError(fmt::format("metadata.numbers[{}]", i), "expected an integer");
      list.set(static_cast<unsigned>(i), (*numbers)[i].get<int64_t>());
    }
    auto target = meta->find("target");
    if (target == meta->end() || !target->is_number_integer())
      return FieldError("metadata.target", "expected an integer");
    out.setTarget(target->get<int64_t>());
  }
  return OkStatus();
}

Status ReadDatasetJsonl(const std::string& path, const DatasetReadOptions& options,
                        const std::function<Status(uint64_t, proto::Task::Reader)>& sink,
                        DatasetReadReport* report) {
  *report = DatasetReadReport{};
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFound(path + ": cannot open dataset");
  std::unordered_map<std::string, uint64_t> first_line_of_id;
  uint64_t fingerprint = Fnv1a64("");
  std::string line;
  uint64_t line_no = 0;
  auto bad = [&](const Status& s) -> Status {
    std::string msg = fmt::format("{}:{}: {}", path, line_no, s.message());
    if (!options.skip_bad) return InvalidArgument(msg);
    if (report->skipped++ == 0) report->first_error = msg;
    return OkStatus();
  };
  while (true) {
    line.clear();
    // Read one line, but never more than kMaxLineBytes of it.
    bool too_long = false, got_any = false;
    std::streambuf* buf = in.rdbuf();
    for (int c; (c = buf->sbumpc()) != std::char_traits<char>::eof();) {
      got_any = true;
      fingerprint = (fingerprint ^ static_cast<unsigned char>(c)) * 1099511628211ull;
      if (c == '\n') break;
      if (line.size() >= kMaxLineBytes) {
        too_long = true;
        continue;
      }
      line.push_back(static_cast<char>(c));
    }
    if (!got_any) break;
    ++line_no;
    if (too_long) {
      RETURN_IF_ERROR(bad(InvalidArgument(fmt::format("line longer than {} bytes", kMaxLineBytes))));
      continue;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    ++report->lines;
    capnp::MallocMessageBuilder message;
    auto task = message.initRoot<proto::Task>();
    Status parsed = ParseTaskJson(line, task);
    if (!parsed.ok()) {
      RETURN_IF_ERROR(bad(parsed));
      continue;
    }
    std::string id(task.getId().cStr());
    auto [it, inserted] = first_line_of_id.emplace(id, line_no);
    if (!inserted) {
      RETURN_IF_ERROR(bad(FieldError("id", fmt::format("duplicate '{}' (first on line {})", id, it->second))));
      continue;
    }
    RETURN_IF_ERROR(sink(line_no, task.asReader()));
    ++report->records;
  }
  if (in.bad()) return IoError(path + ": read failed");
  report->fingerprint = fingerprint;
  return OkStatus();
}

}  // namespace aha::replay
