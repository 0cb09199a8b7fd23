// Helpers shared by the replay tests: temporary directories, datasets, scored samples.
#pragma once

#include <capnp/message.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "proto/trajectory.capnp.h"

namespace aha::replay::testing {

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "aha-replay-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// n math tasks "t0".."t{n-1}" whose answer is the index.
inline std::string WriteDataset(const std::string& path, int n) {
  std::string text;
  for (int i = 0; i < n; ++i)
    text += "{\"id\":\"t" + std::to_string(i) + "\",\"prompt\":\"what is " + std::to_string(i) +
            "?\",\"answer\":\"" + std::to_string(i) + "\",\"kind\":\"math\"}\n";
  return WriteFile(path, text);
}

// Owns the messages whose readers a test hands to ReplayStore::Ingest.
class Samples {
 public:
  proto::ScoredTrajectory::Reader Add(const std::string& group_id, uint32_t index, float reward,
                                      uint64_t version = 0, bool correct = false,
                                      const std::string& text = "completion", size_t pad_tokens = 0) {
    auto m = std::make_unique<capnp::MallocMessageBuilder>();
    auto st = m->initRoot<proto::ScoredTrajectory>();
    st.setReward(reward);
    st.setCorrect(correct);
    auto c = st.initComponents(1);
    c[0].setName("accuracy");
    c[0].setScore(reward);
    c[0].setWeight(1);
    auto t = st.initTrajectory();
    t.setGroupId(group_id);
    t.setSampleIndex(index);
    t.setCompletionText(text);
    auto spans = t.initVersionSpans(1);
    spans[0].setVersion(version);
    auto tokens = t.initCompletionTokens(static_cast<unsigned>(pad_tokens));
    for (unsigned i = 0; i < pad_tokens; ++i) tokens.set(i, i);
    auto r = st.asReader();
    messages_.push_back(std::move(m));
    return r;
  }

 private:
  std::vector<std::unique_ptr<capnp::MallocMessageBuilder>> messages_;
};

}  // namespace aha::replay::testing
