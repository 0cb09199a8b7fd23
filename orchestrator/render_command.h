// `aha render k8s|slurm JOB.yaml --out DIR`: the job as Kubernetes manifests or as a Slurm batch
// script (shared/DESIGN.md §8). Both run the command lines `aha run` runs on one machine — the
// stage commands (aha init, sft, sample, eval, report) and one process per role (aha-replay,
// aha-rewardd, aha-learner, aha-actor per topology.actors entry) — with addresses that point
// across machines instead of at loopback. docs/deploy.md is the step-by-step guide.
//
// Ports (B = ports.base, or 7100 when the job says 0: a cluster needs ports fixed in advance):
//   B+0 replay rpc, B+1 replay ingest, B+2 rewardd listen, B+3 learner weights (as `aha run`);
//   role k (replay 0, rewardd 1, learner 2, actor i 3+i): control B+10+2k, metrics B+11+2k.
// Every port is distinct, so several roles may share a node (one Slurm node runs them all).
//
// The rendered job file is the resolved job (every key) with two changes: relative paths are
// resolved (k8s: against --job-dir inside the image; slurm: against the job file's folder, as
// `aha run` does), and devices are numbered per process — a process sees only the GPUs given to
// it, so an actor on cuda:3 becomes cuda:0 inside its container or Slurm step.
//
// Kubernetes (DIR/NN-*.yaml; `kubectl apply -f DIR` applies them in file-name order):
//   00 Namespace; 01 ConfigMap aha-job (job.yaml); 02 PersistentVolumeClaim aha-run (ReadWriteMany:
//   the run directory, shared by the learner pod and the actors);
//   10 aha-replay: Service + StatefulSet with a volumeClaimTemplate for its RocksDB;
//   20 aha-rewardd: Service + Deployment;
//   30 aha-learner: Service + Job. Its pod runs the job in order: init container `prepare` (init,
//      sft, sample, eval before; skipped when RUN/procs/prepare.done exists), init container
//      `learner` (aha-learner --resume, restarted in place on failure), container `finish` (eval
//      after, final_model.txt, report). The Service publishes the pod while it is not Ready,
//      because the learner's weights socket lives in an init container;
//   40+i aha-actor-i: Service + Deployment; an init container waits for prepare.done;
//   90 ServiceMonitor (with --service-monitor). Every pod carries prometheus.io/* annotations;
//   GPUs are requested as nvidia.com/gpu when a role's device is cuda.
//
// Slurm (DIR/aha.sbatch, DIR/job.yaml): one batch script. Without GPUs, one allocation on one node
// with a task per process; with GPUs, a heterogeneous job: the learner's GPUs, the GPU actors
// (one GPU per task), and a CPU component for replay, rewardd and CPU actors. Each role is one
// background `srun` step, restarted up to 5 times like `aha run` does; addresses come from
// SLURM_JOB_NODELIST_HET_GROUP_<n>. The run directory (--run-dir, default DIR/run, or
// $AHA_RUN_DIR at submit time) must be on a file system every node sees; a resubmission resumes.
#pragma once

namespace aha {

int RunRenderCommand(int argc, char** argv);

}  // namespace aha
