// Prompt templates: the text a job wraps around each task prompt before tokenizing it.
//
// A template is text in which every `{prompt}` is replaced by the task's prompt; nothing else is
// special (so "\boxed{}" and JSON braces stay as written). A job file names a built-in or gives the
// text itself. Built-ins:
//   r1-zero    DeepSeek-R1-Zero's Table 1 template ("... User: {prompt}. Assistant:")
//   qwen-chat  one user turn in Qwen's ChatML, ending where the assistant starts
//   plain      the prompt unchanged
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace aha::tokenizer {

inline constexpr std::string_view kR1ZeroTemplate =
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> "
    "and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {prompt}. Assistant:";

class PromptTemplate {
 public:
  // A built-in's name, or template text containing `{prompt}` at least once. InvalidArgument
  // otherwise (naming the built-ins).
  static Result<PromptTemplate> Parse(std::string_view spec);
  static PromptTemplate R1Zero();

  std::string Render(std::string_view prompt) const;
  const std::string& text() const { return text_; }

  static std::vector<std::string> BuiltinNames();

 private:
  explicit PromptTemplate(std::string text);
  std::string text_;
  std::vector<std::string> literal_parts_;  // text between the `{prompt}`s; size = slots + 1
};

}  // namespace aha::tokenizer
