// Prompt templates: `{prompt}` substitution and the built-ins.
#include "engine/tokenizer/prompt_template.h"

#include <utility>

namespace aha::tokenizer {
namespace {

constexpr std::string_view kSlot = "{prompt}";

struct Builtin {
  std::string_view name, text;
};
constexpr Builtin kBuiltins[] = {
    {"r1-zero", kR1ZeroTemplate},
    {"qwen-chat", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"},
    {"plain", "{prompt}"},
};

}  // namespace

PromptTemplate::PromptTemplate(std::string text) : text_(std::move(text)) {
  size_t from = 0;
  for (size_t at = text_.find(kSlot); at != std::string::npos; at = text_.find(kSlot, from)) {
    literal_parts_.push_back(text_.substr(from, at - from));
    from = at + kSlot.size();
  }
  literal_parts_.push_back(text_.substr(from));
}

Result<PromptTemplate> PromptTemplate::Parse(std::string_view spec) {
  for (const Builtin& b : kBuiltins)
    if (spec == b.name) return PromptTemplate(std::string(b.text));
  if (spec.find(kSlot) == std::string_view::npos) {
    std::string names;
    for (const Builtin& b : kBuiltins) names += (names.empty() ? "" : ", ") + std::string(b.name);
    return InvalidArgument("prompt template has no {prompt} and is not a built-in (" + names + ")");
  }
  return PromptTemplate(std::string(spec));
}

PromptTemplate PromptTemplate::R1Zero() { return PromptTemplate(std::string(kR1ZeroTemplate)); }

std::string PromptTemplate::Render(std::string_view prompt) const {
  std::string out;
  out.reserve(text_.size() + prompt.size() * (literal_parts_.size() - 1));
  for (size_t i = 0; i < literal_parts_.size(); ++i) {
    if (i > 0) out += prompt;
    out += literal_parts_[i];
  }
  return out;
}

std::vector<std::string> PromptTemplate::BuiltinNames() {
  std::vector<std::string> names;
  for (const Builtin& b : kBuiltins) names.emplace_back(b.name);
  return names;
}

}  // namespace aha::tokenizer
