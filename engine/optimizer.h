// AdamW over a model's flat parameter buffer, and global gradient-norm clipping.
//
// AdamW is torch.optim.AdamW (decoupled weight decay, bias-corrected moments, eps outside the sqrt).
// Moments are f32 buffers of the same flat layout as the parameters. Weight decay applies to every
// parameter unless a name filter says otherwise (norm weights and biases are commonly excluded).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "engine/transformer.h"

namespace aha::engine {

struct AdamWOptions {
  float lr = 1e-5f;
  float beta1 = 0.9f, beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  // Returns true for parameters that get weight decay; null = all.
  std::function<bool(const std::string& name)> decay_filter;
};

// Global L2 norm of all gradients (f64 accumulation); when it exceeds max_norm (> 0), scales every
// gradient by max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_. Returns the norm before
// clipping.
double ClipGradNorm(Backend* backend, float* grads, size_t n, double max_norm);

class AdamW {
 public:
  AdamW(Transformer* model, AdamWOptions options);
  // One update from the model's current gradients; step() counts from 1.
  void Step();
  // Step with an explicit learning rate (schedules).
  void Step(float lr);
  int64_t step() const { return t_; }
  Tensor& m() { return m_; }
  Tensor& v() { return v_; }
  void set_step(int64_t t) { t_ = t; }

 private:
  Transformer* model_;
  AdamWOptions opt_;
  Tensor m_, v_;
  int64_t t_ = 0;
};

}  // namespace aha::engine
