"""The GPU proof of both stages (issue 12), or its rehearsal on the CPU: every check, every number to JSON.

    bash bench/gpu/run.sh --out DIR [--device cuda|cpu] [--tiny] [--work DIR] [--only CHECK,...]

Each check writes DIR/<check>.json; DIR/summary.json lists every target with its measured value
and whether it was met, every pass/fail check, the device and the versions. Sizes come from
bench/gpu/fixtures.py (`full`: a ~1B scorer and a ~0.5B policy at vocabulary 151,936 on one
GPU; `tiny`: the same code paths at toy sizes). Everything heavy runs in a subprocess of its
own (the real `selpipe` CLI, TRL, bench/memory.py), so no check's GPU memory or imports leak
into another, and its log lands in WORK/logs/.

- stage_one_parity: `selpipe score-ref --backend hf` in the low precision (bf16) and in fp32 on
  the same weights; that the cache holds the token ids drawn; the per-token |difference| between
  the two caches (max, p50, p99, mean); `selpipe verify` of the bf16 cache against fp32
  transformers and of the fp32 cache against fp32 transformers (their JSON reports).
- stage_one_speed: tokens/s and MFU of the hf backend vs the naive loop (bench/gpu/scoring_speed.py).
- stage_two_parity: `selpipe train --top-k 1` for one step on the stage-one cache of the training
  precision (bf16 on a GPU; the ~1B model as reference, the ~0.5B as policy); its logged loss
  against TRL DPOTrainer's loss on the same pairs with that reference live.
- stage_two_runs: 20 steps under ZeRO-0 and under ZeRO-2; losses finite; the same ZeRO-0 run
  SIGKILLed once checkpoint step-10 exists and continued with `--resume`: its later steps
  against the uninterrupted run's.
- stage_two_speed: pairs/s of the ZeRO-0 run vs TRL DPOTrainer with a live same-size reference
  and with `precompute_ref_log_probs=True`; same policy, pairs, batch, lengths, precision.
- memory: bench/memory.py's one-pair log-prob step (forward + backward; peak minus memory before
  the step, `torch.cuda.max_memory_allocated` on a GPU) of selpipe vs TRL's fused head.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.append(str(HERE.parent))  # bench/ (this folder is already first: the script's own)

import numpy as np  # noqa: E402
from fixtures import PROFILES, Profile, eos_id, stage_one_pairs  # noqa: E402

BETA = 0.1           # stage two's runs (a quick visible fall of the loss)
K1_BETA = 0.01       # the k = 1 comparison with TRL (the default beta)
TOP_K = 0.4
# |selpipe - TRL| of the k = 1 loss. fp32: both compute the same sums to float rounding. bf16: a
# per-token log-prob carries ~1e-2 of rounding, summed over ~900 tokens per response and scaled by
# beta = 0.01, then averaged over the pairs; 1e-2 on the loss leaves several times that margin.
K1_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
# |resumed - uninterrupted| per logged metric after the kill. fp32 on the CPU is deterministic;
# on a GPU some bf16 kernels reduce in a varying order.
RESUME_TOLERANCE = {"fp32": 1e-6, "bf16": 2e-3}
RESUME_METRICS = ("loss", "grad_norm", "rewards/margins")
VERIFY_SAMPLE = 8
VERIFY_LOW_TOLERANCE = 0.25  # a bf16 cache against fp32 transformers: reported, not a target
TARGETS = {"hf_over_naive": 3.0, "hf_mfu": 0.40, "train_over_trl_live": 1.3, "memory_over_trl": 0.6}
CHECKS = ("stage_one_parity", "stage_one_speed", "stage_two_parity", "stage_two_runs", "stage_two_speed", "memory")


class CheckError(RuntimeError):
    """A step of a check failed; the message names the command and the end of its log."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment(work: Path) -> dict[str, str]:
    from benchlib import thread_env

    # Nothing may reach a hub; every cache of the Hugging Face libraries stays in the work folder.
    return {**thread_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf"),
            "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def read_cache(path: Path) -> dict[str, dict]:
    """Cache rows by id, with any Parquet reader (the format's promise): here pyarrow."""
    import pyarrow.parquet as pq

    return {row["id"]: row for part in sorted(path.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()}


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def finite(values: list[float]) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


class Proof:
    """The checks, what they share (fixtures, caches, runs: each built once, on first use) and their results."""

    def __init__(self, profile: str, device: str, out: Path, work: Path):
        self.profile: Profile = PROFILES[profile]
        # Models, caches and runs are reused by a rerun (`--only`) with the same sizes and device, never across them.
        self.profile_name, self.device, self.out, self.work = profile, device, out, work / f"{profile}-{device}"
        self.gpu = device == "cuda"
        for folder in (out, self.work / "logs", self.work / "runs", self.work / "caches"):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = environment(self.work)
        self.results: dict[str, dict] = {}
        self._fixtures: dict | None = None

    # ------------------------------------------------------------------------ processes

    def run(self, command: list[str], name: str, *, check: bool = True) -> subprocess.CompletedProcess:
        """A subprocess with the proof's environment; stderr to WORK/logs/NAME.log, stdout returned."""
        log(f"  {name}")
        with open(self.work / "logs" / f"{name}.log", "w") as errors:
            try:
                result = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE, stderr=errors, text=True,
                                        env=self.env, cwd=REPO, timeout=self.profile.timeout_s)
            except subprocess.TimeoutExpired:
                raise CheckError(f"{name} ran past {self.profile.timeout_s} s; log {errors.name}") from None
        (self.work / "logs" / f"{name}.out").write_text(result.stdout)
        if check and result.returncode != 0:
            raise CheckError(f"{name} exited {result.returncode}: {' '.join(map(str, command))}\n"
                             f"{self.tail(name)}")
        return result

    def tail(self, name: str, lines: int = 25) -> str:
        text = (self.work / "logs" / f"{name}.log").read_text().splitlines()
        return "\n".join(text[-lines:])

    def selpipe(self, *args: Any, name: str, check: bool = True) -> subprocess.CompletedProcess:
        """The `selpipe` console script's module, so it runs wherever the package was installed."""
        return self.run([sys.executable, "-m", "selpipe.cli.app", *args], name, check=check)

    # ------------------------------------------------------------------------ what checks share

    @property
    def fixtures(self) -> dict:
        path = self.work / "fixtures.json"
        if self._fixtures is None:
            if not path.exists():
                self.run([sys.executable, HERE / "fixtures.py", "--profile", self.profile_name, "--work", self.work,
                          "--device", self.device], "fixtures")
            self._fixtures = json.loads(path.read_text())
        return self._fixtures

    def model(self, role: str) -> str:
        return self.fixtures["models"][role]["path"]

    def score(self, name: str, data: str, model: str, dtype: str, max_length: int, max_prompt_length: int) -> Path:
        """A complete cache written by `selpipe score-ref --backend hf` (reused if already complete)."""
        cache = self.work / "caches" / name
        if not (cache / "manifest.json").exists():
            shutil.rmtree(cache, ignore_errors=True)
            self.selpipe("score-ref", "--input", data, "--output", cache, "--model", model, "--backend", "hf",
                         "--dtype", dtype, "--device", self.device, "--max-length", max_length,
                         "--max-prompt-length", max_prompt_length, "--no-progress", name=f"score-ref-{name}")
        return cache

    def stage_one_cache(self, dtype: str) -> Path:
        s = self.profile.stage_one
        return self.score(f"stage-one-{dtype}", self.fixtures["data"]["stage_one"], self.model("scorer"), dtype,
                          s.max_length, s.prompt)

    def stage_two_cache(self) -> Path:
        """Stage two's pairs scored by the policy's own weights (the same-size reference), in the training precision."""
        s = self.profile.stage_two
        return self.score(f"stage-two-{self.profile.train_dtype}", self.fixtures["data"]["stage_two"],
                          self.model("policy"), self.profile.train_dtype, s.max_length, s.prompt)

    def deepspeed_config(self, stage: int) -> Path:
        """configs/zero{stage}.json with torch's AdamW. selpipe asks for it only without CUDA; on a GPU
        DeepSpeed would JIT-compile its FusedAdam, which needs nvcc and a minute this proof does not have."""
        path = self.work / f"zero{stage}-torch-adam.json"
        config = json.loads((REPO / "configs" / f"zero{stage}.json").read_text())
        config["optimizer"]["params"]["torch_adam"] = True
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    def train_config(self, run: str, **overrides: Any) -> dict[str, Any]:
        p = self.profile
        cache = overrides.pop("cache", None) or str(self.stage_two_cache())
        return {"cache": cache, "policy": self.model("policy"),
                "output": str(self.work / "runs" / run), "top_k": TOP_K, "beta": BETA, "learning_rate": p.learning_rate,
                "max_steps": p.steps, "global_batch_size": p.global_batch, "micro_batch_size": p.micro_batch,
                "zero_stage": 0, "deepspeed_config": str(self.deepspeed_config(0)), "precision": p.train_precision,
                "save_every": p.save_every, "save_model": False, "progress": False, "log_every": 1, **overrides}

    def train_command(self, config: dict[str, Any]) -> list[Any]:
        """`selpipe train --config FILE`, inside bench/gpu/peak_memory.py so its peak memory is recorded."""
        run = Path(config["output"])
        run.mkdir(parents=True, exist_ok=True)
        path = run.parent / f"{run.name}.json"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return [sys.executable, HERE / "peak_memory.py", run.parent / f"{run.name}.peak.json", "selpipe.cli.app",
                "train", "--config", path]

    def train(self, run: str, **overrides: Any) -> list[dict]:
        """A finished `selpipe train` run's metrics (reused if already finished); its checkpoints are then
        deleted (several GB each at 0.5B parameters)."""
        directory = self.work / "runs" / run
        if not (directory / "summary.json").exists():
            shutil.rmtree(directory, ignore_errors=True)
            self.run(self.train_command(self.train_config(run, **overrides)), f"train-{run}")
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        return read_metrics(directory)

    def zero0(self) -> list[dict]:
        return self.train("zero0")

    # ------------------------------------------------------------------------ checks

    def stage_one_parity(self) -> dict:
        p = self.profile
        low, high = self.stage_one_cache(p.low_dtype), self.stage_one_cache("float32")
        rows_low, rows_high = read_cache(low), read_cache(high)
        diffs = np.concatenate([
            np.abs(np.asarray(rows_low[i][f"{side}_ref_logps"], np.float64) - np.asarray(rows_high[i][f"{side}_ref_logps"], np.float64))
            for i in sorted(rows_low) for side in ("chosen", "rejected")])
        eos = eos_id(p.vocab)
        drawn = {pair.id: pair for pair in stage_one_pairs(p)}
        ids_match = sorted(rows_low) == sorted(drawn) and all(
            [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]
            == [drawn[i].prompt_ids, drawn[i].chosen_ids + [eos], drawn[i].rejected_ids + [eos]]
            for cache in (rows_low, rows_high) for i, row in cache.items())

        def verify(cache: Path, name: str, *options: Any) -> dict:
            """verify's JSON report and exit code (1: above the tolerance); a command that gave no
            report is recorded with its error, and the numbers above still stand."""
            result = self.selpipe("verify", cache, "--model", self.model("scorer"), "--device", self.device,
                                  "--sample", VERIFY_SAMPLE, "--json", *options, name=name, check=False)
            if result.returncode not in (0, 1):
                return {"exit_code": result.returncode, "error": self.tail(name, lines=5)}
            return {"exit_code": result.returncode, "report": json.loads(result.stdout)}

        return {
            "model": "scorer", "parameters": self.fixtures["models"]["scorer"]["parameters"], "backend": "hf",
            "dtypes": [p.low_dtype, "float32"], "pairs": len(rows_low), "tokens_compared": int(diffs.size),
            "token_ids_match_drawn": ids_match,
            "abs_diff": {"max": float(diffs.max()), "p50": float(np.percentile(diffs, 50)),
                         "p99": float(np.percentile(diffs, 99)), "mean": float(diffs.mean())},
            "all_finite": bool(np.isfinite(diffs).all()),
            "verify_low_vs_fp32": verify(low, f"verify-{p.low_dtype}", "--dtype", "float32",
                                         "--tolerance", VERIFY_LOW_TOLERANCE),
            "verify_fp32_vs_fp32": verify(high, "verify-float32"),
        }

    def stage_one_speed(self) -> dict:
        output = self.work / "stage-one-speed.json"
        scorer = self.fixtures["models"]["scorer"]
        self.run([sys.executable, HERE / "scoring_speed.py", "--profile", self.profile_name, "--model", scorer["path"],
                  "--parameters", scorer["parameters"], "--device", self.device, "--dtype", self.profile.low_dtype,
                  "--output", output], "scoring-speed")
        return {**json.loads(output.read_text()), "model_shape": scorer["shape"]}

    def stage_two_parity(self) -> dict:
        p = self.profile
        cache = self.stage_one_cache(p.train_dtype)
        pairs = p.stage_one.pairs
        # One optimizer step whose global batch is every pair: its logged loss is the mean over all of them.
        metrics = self.train("k1", cache=str(cache), top_k=1.0, beta=K1_BETA, max_steps=1, global_batch_size=pairs,
                             save_every=0)
        output = self.work / "trl-k1.json"
        self.run([sys.executable, HERE / "trl_peer.py", "loss", "--policy", self.model("policy"),
                  "--reference", self.model("scorer"), "--data", self.fixtures["data"]["stage_one"], "--cache", cache,
                  "--output", output, "--work-dir", self.work / "trl-k1", "--device", self.device,
                  "--precision", p.train_precision, "--micro-batch-size", p.micro_batch, "--beta", K1_BETA,
                  "--max-length", p.stage_one.max_length], "trl-k1")
        trl = json.loads(output.read_text())
        difference = abs(metrics[0]["loss"] - trl["loss"])
        tolerance = K1_TOLERANCE[p.train_precision]
        return {"precision": p.train_precision, "pairs": pairs, "beta": K1_BETA, "policy": "policy", "reference": "scorer",
                "selpipe_loss": metrics[0]["loss"], "selpipe_dpo_loss": metrics[0]["dpo_loss"], "trl_loss": trl["loss"],
                "trl_pairs": trl["pairs"], "trl_tokenization_mismatches": trl["tokenization_mismatches"],
                "abs_diff": difference, "tolerance": tolerance,
                "equal": difference <= tolerance and not trl["tokenization_mismatches"] and trl["pairs"] == pairs}

    def kill_at_checkpoint(self, run: str) -> dict:
        """Start the ZeRO-0 run again in `run`, SIGKILL it once checkpoint step-N is complete, then `--resume` it."""
        p = self.profile
        directory = self.work / "runs" / run
        shutil.rmtree(directory, ignore_errors=True)
        config = self.train_config(run)
        command = [str(c) for c in self.train_command(config)]
        marker, target = directory / "checkpoints" / "latest", f"step-{p.save_every}"
        log(f"  train-{run} (SIGKILL once {target} exists)")
        with open(self.work / "logs" / f"train-{run}.log", "w") as errors:
            process = subprocess.Popen(command, stdout=errors, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                       start_new_session=True)
            deadline, at_target = time.monotonic() + p.timeout_s, False
            while process.poll() is None and time.monotonic() < deadline:
                # `latest` is written only once the checkpoint is whole on every rank.
                if marker.exists() and marker.read_text().strip() == target:
                    at_target = True
                    break
                time.sleep(0.005)
            if process.poll() is None:  # at the checkpoint, or past the deadline
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        killed = at_target and process.returncode == -signal.SIGKILL
        logged = [m["step"] for m in read_metrics(directory)] if (directory / "metrics.jsonl").exists() else []
        self.run(self.train_command({**config, "resume": True}), f"train-{run}-resumed")
        summary = json.loads((directory / "summary.json").read_text())
        shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        return {"killed_by_sigkill_after": target if killed else None, "exit_code_of_killed": process.returncode,
                "last_step_logged_before_kill": max(logged, default=None),
                "steps_run_after_resume": summary["steps_this_run"], "metrics": read_metrics(directory)}

    def stage_two_runs(self) -> dict:
        p = self.profile
        runs = {"zero0": self.zero0(),
                "zero2": self.train("zero2", zero_stage=2, deepspeed_config=str(self.deepspeed_config(2)))}
        resumed = self.kill_at_checkpoint("killed")
        result: dict[str, Any] = {"precision": p.train_precision, "steps": p.steps, "top_k": TOP_K, "beta": BETA}
        for name, metrics in runs.items():
            losses, plain = [m["loss"] for m in metrics], [m["dpo_loss"] for m in metrics]
            # The selective loss scores the tokens the policy handles worst, so it need not fall;
            # plain DPO's loss on the same pairs (`dpo_loss`) shows whether the policy learns.
            result[name] = {"losses": losses, "dpo_losses": plain, "steps_logged": len(losses),
                            "all_finite": finite(losses) and finite(plain), "dpo_loss_fell": finite(plain) and plain[-1] < plain[0]}
        result["zero0_vs_zero2_max_abs_loss_diff"] = max(
            abs(a - b) for a, b in zip(result["zero0"]["losses"], result["zero2"]["losses"], strict=True))
        uninterrupted = {m["step"]: m for m in runs["zero0"]}
        after = [m for m in resumed.pop("metrics") if m["step"] > p.save_every]
        differences = {key: max((abs(m[key] - uninterrupted[m["step"]][key]) for m in after), default=None)
                       for key in RESUME_METRICS}
        tolerance = RESUME_TOLERANCE[p.train_precision]
        result["resume"] = {
            **resumed, "compared_steps": [m["step"] for m in after], "max_abs_diff": differences, "tolerance": tolerance,
            "resumed_losses": [m["loss"] for m in after],
            "equal": (resumed["killed_by_sigkill_after"] is not None and len(after) == p.steps - p.save_every
                      and all(d is not None and d <= tolerance for d in differences.values())),
        }
        return result

    def trl_train(self, name: str, *, precompute: bool) -> dict:
        p = self.profile
        output = self.work / f"{name}.json"
        self.run([sys.executable, HERE / "trl_peer.py", "train", "--policy", self.model("policy"),
                  "--reference", self.model("policy"), "--data", self.fixtures["data"]["stage_two"], "--output", output,
                  "--work-dir", self.work / name, "--device", self.device, "--precision", p.train_precision,
                  "--micro-batch-size", p.micro_batch, "--global-batch-size", p.global_batch, "--steps", p.steps,
                  "--beta", BETA, "--learning-rate", p.learning_rate, "--max-length", p.stage_two.max_length,
                  *(["--precompute"] if precompute else [])], name)
        return json.loads(output.read_text())

    def stage_two_speed(self) -> dict:
        from train_throughput import steady  # bench/train_throughput.py: median step after warm-up

        p = self.profile
        metrics = self.zero0()
        seconds = [p.global_batch / m["pairs_per_second"] for m in metrics]
        ours = steady(seconds, [m["tokens_per_second"] * s for m, s in zip(metrics, seconds)], p.global_batch, p.warmup_steps)
        peak = json.loads((self.work / "runs" / "zero0.peak.json").read_text())
        ours["peak_memory_mib"] = peak["peak_allocated_mib"] if self.gpu else peak["peak_rss_mib"]
        peers = {}
        for name, precompute in (("trl_live", False), ("trl_precompute", True)):
            run = self.trl_train(name.replace("_", "-"), precompute=precompute)
            peers[name] = {**steady(run["step_seconds"], run["step_tokens"], run["pairs_per_step"], p.warmup_steps),
                           "setup_s": run["setup_s"], "losses": run["losses"], "losses_finite": finite(run["losses"]),
                           "peak_memory_mib": run["peak_memory_mib"]}
        return {
            "policy_parameters": self.fixtures["models"]["policy"]["parameters"], "vocab": p.vocab,
            "precision": p.train_precision, "pairs": p.stage_two.pairs, "max_length": p.stage_two.max_length,
            "micro_batch": p.micro_batch, "global_batch": p.global_batch, "steps": p.steps,
            "warmup_steps_left_out": p.warmup_steps, "gradient_checkpointing": False,
            "selpipe": {"run": "zero0 (ZeRO-0, torch AdamW, top-k 0.4)", **ours}, **peers,
            "ratio_over_trl_live": ours["pairs_per_second"] / peers["trl_live"]["pairs_per_second"],
            "ratio_over_trl_precompute": ours["pairs_per_second"] / peers["trl_precompute"]["pairs_per_second"],
            "peak_memory_kind": ("torch.cuda.max_memory_allocated over the whole process" if self.gpu
                                 else "peak RSS (VmHWM) over the whole process"),
        }

    def memory(self) -> dict:
        import memory  # bench/memory.py: each measurement in a fresh process

        p = self.profile
        rows = {}
        for method in memory.METHODS:
            log(f"  memory {method} vocab {p.memory_vocab} x {p.memory_seq_len} tokens")
            rows[method] = memory.run_config(method, p.memory_vocab, p.memory_seq_len)
        return {"vocab": p.memory_vocab, "seq_len": p.memory_seq_len, "model": memory.MODEL, "rows": rows,
                "measured": "one pair's log-prob forward + backward; peak minus memory before the step "
                            + ("(torch.cuda.max_memory_allocated)" if self.gpu else "(RSS high-water mark)"),
                "ratio_selpipe_over_trl": rows["selpipe"]["step_peak_mib"] / rows["trl"]["step_peak_mib"]}

    # ------------------------------------------------------------------------ the run

    def run_checks(self, names: list[str], started: float) -> None:
        for name in names:
            log(f"{name}")
            started = time.perf_counter()
            check: Callable[[], dict] = getattr(self, name)
            try:
                result = check()
            except Exception as err:  # one failed check must not cost the others their numbers
                log(f"{name} FAILED: {err}")
                result = {"error": str(err), "traceback": traceback.format_exc()}
            result["seconds"] = round(time.perf_counter() - started, 1)
            self.results[name] = result
            (self.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            # After every check, so a run stopped at the device's time limit still leaves one.
            self.write_summary(time.perf_counter() - started)

    def write_summary(self, seconds: float) -> dict:
        summary = self.summary(seconds)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def summary(self, seconds: float) -> dict:
        r = self.results
        binding = self.gpu  # the targets are stated for an H100; on the CPU they are recorded, not claimed

        def target(name: str, check: str, key: Callable[[dict], Any], goal: str, met: Callable[[float], bool]) -> dict:
            value = key(r[check]) if check in r and "error" not in r[check] else None
            return {"target": name, "goal": goal, "measured": value, "met": None if value is None else met(value),
                    "binding": binding, "file": f"{check}.json"}

        def passed(name: str, check: str, key: Callable[[dict], Any]) -> dict:
            ok = key(r[check]) if check in r and "error" not in r[check] else None
            return {"check": name, "passed": ok, "file": f"{check}.json"}

        s_memory = f"vocab {self.profile.memory_vocab:,}, {self.profile.memory_seq_len:,} tokens"
        return {
            "device": (self._fixtures or {}).get("device"), "mode": self.profile_name, "versions": versions(),
            "selpipe_installed_matches_tree": installed_matches_tree(), "seconds": round(seconds, 1),
            "targets": [
                target("stage one: hf backend tokens/s over the naive loop", "stage_one_speed",
                       lambda x: x["hf_over_naive"], f">= {TARGETS['hf_over_naive']}x", lambda v: v >= TARGETS["hf_over_naive"]),
                target("stage one: hf backend MFU (2 x params x tokens / s / 989 TFLOP/s)", "stage_one_speed",
                       lambda x: x["hf_mfu"], f">= {TARGETS['hf_mfu']:.0%}",
                       lambda v: v is not None and v >= TARGETS["hf_mfu"]),
                target("stage two: selpipe train pairs/s over TRL DPOTrainer (live same-size reference)", "stage_two_speed",
                       lambda x: x["ratio_over_trl_live"], f">= {TARGETS['train_over_trl_live']}x",
                       lambda v: v >= TARGETS["train_over_trl_live"]),
                target(f"peak memory of the log-prob step over TRL's ({s_memory})", "memory",
                       lambda x: x["ratio_selpipe_over_trl"], f"<= {TARGETS['memory_over_trl']}x",
                       lambda v: v <= TARGETS["memory_over_trl"]),
            ],
            "checks": [
                passed("stage one: the caches hold the token ids drawn", "stage_one_parity", lambda x: x["token_ids_match_drawn"]),
                passed("stage one: verify of the fp32 cache passes at 1e-3", "stage_one_parity",
                       lambda x: x["verify_fp32_vs_fp32"]["exit_code"] == 0),
                passed(f"stage one: verify of the {self.profile.low_dtype} cache vs fp32 within {VERIFY_LOW_TOLERANCE}",
                       "stage_one_parity", lambda x: x["verify_low_vs_fp32"]["exit_code"] == 0),
                passed("stage two: loss at k = 1 equals TRL's on the same pairs", "stage_two_parity", lambda x: x["equal"]),
                passed("stage two: ZeRO-0 losses finite, plain-DPO loss lower at step 20 than at step 1", "stage_two_runs",
                       lambda x: x["zero0"]["all_finite"] and x["zero0"]["dpo_loss_fell"]),
                passed("stage two: ZeRO-2 losses finite, plain-DPO loss lower at step 20 than at step 1", "stage_two_runs",
                       lambda x: x["zero2"]["all_finite"] and x["zero2"]["dpo_loss_fell"]),
                passed("stage two: SIGKILL after step-10, --resume gives the same later steps", "stage_two_runs",
                       lambda x: x["resume"]["equal"]),
            ],
            "errors": {name: result["error"] for name, result in r.items() if "error" in result},
        }


def versions() -> dict[str, str | None]:
    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "deepspeed", "trl", "datasets", "accelerate", "pyarrow", "selpipe"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def installed_matches_tree() -> list[str] | bool:
    """True when the selpipe that runs is this checkout's code; else the files that differ (a carried
    wheel built before the tree changed would prove stale code)."""
    import importlib

    differing = []
    for folder in ("pipeline", "stages", "cli"):
        installed = Path(importlib.import_module(f"selpipe.{folder}").__file__).parent
        if installed.resolve() == (REPO / folder).resolve():
            continue  # an editable install
        for source in sorted((REPO / folder).rglob("*.py")):
            copy = installed / source.relative_to(REPO / folder)
            if not copy.exists() or copy.read_bytes() != source.read_bytes():
                differing.append(str(source.relative_to(REPO)))
    return differing or True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON files go (keep it small: no models)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the CPU rehearsal of the same code paths")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "selpipe-gpu-proof",
                        help="models, caches, runs and logs (several GB in the full setting)")
    parser.add_argument("--only", help=f"comma-separated checks to run, of {', '.join(CHECKS)}")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but no GPU is visible; use --device cpu --tiny for the CPU rehearsal")
    started = time.perf_counter()
    proof = Proof("tiny" if args.tiny else "full", args.device, args.out, args.work)
    log(f"GPU proof: profile {proof.profile_name}, device {args.device}, out {args.out}, work {proof.work}")
    proof.run_checks(names, started)
    summary = proof.write_summary(time.perf_counter() - started)
    for row in summary["targets"]:
        log(f"target  {row['target']}: {row['measured']} ({row['goal']}) met={row['met']}")
    for row in summary["checks"]:
        log(f"check   {row['check']}: {row['passed']}")
    for name, error in summary["errors"].items():
        log(f"error   {name}: {error.splitlines()[0]}")
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
