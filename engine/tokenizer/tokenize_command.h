// `aha tokenize`: text to token ids and back, from the command line.
//
//   aha tokenize --tokenizer FILE|DIR|bytes [--lines] [--add-special] < text     JSON array of ids
//   aha tokenize --tokenizer FILE|DIR|bytes --decode [--lines] [--skip-special] < ids
//
// Encoding reads all of stdin (without BOS/EOS unless --add-special, like Hugging Face's
// add_special_tokens=False) and prints one JSON array; with --lines, one array per input line
// (the newline itself is not encoded). --decode reads one JSON array (or one per line with --lines)
// and prints the text; with --lines each text ends with a newline.
#pragma once

#include <iosfwd>

namespace aha::tokenizer {

int RunTokenizeCommand(int argc, char** argv);
// The same with explicit streams (tests).
int RunTokenize(int argc, char** argv, std::istream& in, std::ostream& out);

}  // namespace aha::tokenizer
