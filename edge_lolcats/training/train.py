"""LoLCATs training: stage 1 (attention transfer) and stage 2 (LoRA), resumable after any kill.

Stage 1 trains only the feature maps and window factors. Each hybrid layer receives the teacher's
input for that layer and learns to match the teacher's per-head attention output (before o_proj)
under MSE; the teacher's output, not the student's, is passed on, so layers train independently
and each layer's loss is backpropagated on its own (memory of one layer's graph at a time).

Stage 2 freezes them, puts LoRA on the attention projections and trains it with next-token
cross-entropy, optionally plus KL(teacher || student) on the logits (``kd``). The teacher is the
same model in :class:`~edge_lolcats.nn.model.teacher_mode`: no second copy of the weights.

Checkpoints: every ``save_every`` steps the trainable tensors, optimizer moments, RNG state and
position are written to ``work_dir/checkpoints/s{stage}-{step}`` through a temporary folder renamed
into place, with a SHA-256 of the tensors in ``state.json``. Resuming picks the newest checkpoint
that verifies, so a half-written one is never loaded. Data order depends only on the seed and the
step, so a resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from edge_lolcats.formats.checkpoint import is_delta_param
from edge_lolcats.formats.fileio import atomic_folder
from edge_lolcats.nn.lora import DEFAULT_TARGETS, apply_lora, lora_modules
from edge_lolcats.arch import block
from edge_lolcats.arch.hybrid import Recurrence
from edge_lolcats.arch.ops import TorchOps
from edge_lolcats.nn.model import HybridAttention, forward, teacher_mode

CHECKPOINT_RE = re.compile(r"^s([12])-(\d{7})$")


class TrainingError(ValueError):
    pass


@dataclass
class TrainConfig:
    stage1_tokens: int = 0
    stage2_tokens: int = 0
    seq_len: int = 1024
    stage2_seq_len: int = 0  # stage 2's sequences, if not seq_len (the same token stream, cut longer)
    batch_size: int = 1
    stage1_lr: float = 1e-2
    stage2_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mse_weight: float = 1000.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = DEFAULT_TARGETS
    kd: bool = False
    kd_weight: float = 1.0
    seed: int = 0
    save_every: int = 25
    device: str = "cpu"

    def stage_seq_len(self, stage: int) -> int:
        return self.stage2_seq_len if stage == 2 and self.stage2_seq_len else self.seq_len

    def steps(self, stage: int) -> int:
        tokens = self.stage1_tokens if stage == 1 else self.stage2_tokens
        return math.ceil(tokens / (self.stage_seq_len(stage) * self.batch_size)) if tokens > 0 else 0

    # settings a resumed run must share with the run it continues
    IDENTITY = ("seq_len", "stage2_seq_len", "batch_size", "stage1_lr", "stage2_lr", "weight_decay", "grad_clip", "mse_weight",
                "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "kd", "kd_weight", "seed")


@dataclass
class Progress:
    stage: int = 1
    step: int = 0  # steps completed in this stage
    train_seconds: float = 0.0  # wall-clock seconds of training steps, summed over every session of the run
    cpu_seconds: float = 0.0  # process CPU time of those steps (all threads), likewise
    tokens: dict = field(default_factory=lambda: {"1": 0, "2": 0})


# --- data order ---------------------------------------------------------------------------------


def batch_indices(n_sequences: int, stage: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Which training sequences form batch ``step`` of ``stage``: a fresh permutation per epoch."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(g, n_sequences)
        perm = np.random.default_rng([seed, stage, epoch]).permutation(n_sequences)
        out.append(perm[i])
    return np.asarray(out)


def repack(sequences: np.ndarray, seq_len: int) -> np.ndarray:
    """The packed token stream [n, L] cut into sequences of ``seq_len`` instead (the tail dropped)."""
    if seq_len == sequences.shape[1]:
        return sequences
    flat = sequences.reshape(-1)
    n = len(flat) // seq_len
    if n == 0:
        raise TrainingError(f"the training text holds fewer than {seq_len} tokens")
    return flat[: n * seq_len].reshape(n, seq_len)


# --- the two losses -----------------------------------------------------------------------------


def stage1_step(model, input_ids: torch.Tensor, mse_weight: float, backward: bool = True) -> float:
    """Attention transfer on one batch; backpropagates each layer's loss (unless ``backward`` is
    False, for evaluation); returns the mean over layers.

    The decoder runs as always (:mod:`edge_lolcats.arch.block`), without gradients; each layer's
    attention computes the teacher's output, trains the hybrid against it, and passes the
    teacher's output on."""
    args, inner = model.args, model.model
    xp = TorchOps(input_ids.device)
    losses = []

    def transfer(attn):
        if not isinstance(attn, HybridAttention):  # a kept window layer is its own teacher
            return lambda q, k, v, rotate: attn.teacher(rotate(q), rotate(k), v)

        def attend(q, k, v, rotate):
            target = attn.teacher(rotate(q), rotate(k), v).float()  # [B, H, N, D]
            with torch.set_grad_enabled(backward):
                student, _ = attn.attend(q, k, v, rotate)
                loss = F.mse_loss(student.float(), target) * mse_weight
            if backward:
                loss.backward()
            losses.append(loss.item())
            return target.to(v.dtype)
        return attend

    with torch.no_grad():
        rotate = block.rotations(xp, args, torch.arange(input_ids.shape[1], device=input_ids.device))
        x = block.embed(xp, args, inner.embed_tokens, input_ids)
        for i, layer in enumerate(inner.layers):
            x = block.layer(xp, args, layer, x, rotate[args.layer_types[i]], transfer(layer.self_attn))
    return float(np.mean(losses))


def stage2_step(model, input_ids: torch.Tensor, kd: bool, kd_weight: float, backward: bool = True) -> dict:
    """Next-token cross-entropy (plus KL to the teacher with ``kd``); backpropagates; returns parts."""
    logits, _ = forward(model, input_ids, with_state=False)
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss, parts = ce, {"ce": ce.item()}
    if kd:
        with torch.no_grad(), teacher_mode(model):
            teacher_logits, _ = forward(model, input_ids, with_state=False)
        teacher_logp = teacher_logits[:, :-1].float().log_softmax(-1)
        kl = F.kl_div(logits.log_softmax(-1), teacher_logp, log_target=True, reduction="none").sum(-1).mean()
        loss = loss + kd_weight * kl
        parts["kl"] = kl.item()
    if backward:
        loss.backward()
    parts["loss"] = loss.item()
    return parts


# --- trainable parameters per stage ---------------------------------------------------------------


def set_trainable(model, stage: int) -> list:
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        if (stage == 1 and is_delta_param(name) and not is_lora) or (stage == 2 and is_lora):
            p.requires_grad_(True)
            params.append(p)
    if not params:
        hint = " (every layer kept its base window: linearize with --sliding-layers linearize)" if stage == 1 else ""
        raise TrainingError(f"no trainable parameters for stage {stage}{hint}")
    return params


def make_optimizer(params, config: TrainConfig, stage: int):
    lr = config.stage1_lr if stage == 1 else config.stage2_lr
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def delta_tensors(model) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if is_delta_param(n)}


# --- checkpoints --------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_training_state(work_dir: str, model, optimizer, progress: Progress, meta: dict, keep: int = 2) -> str:
    ckpt_root = os.path.join(work_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    tensors = {"param." + k: v for k, v in delta_tensors(model).items()}
    opt_state = optimizer.state_dict()
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"s{progress.stage}-{progress.step:07d}"
    final = os.path.join(ckpt_root, name)
    with atomic_folder(final) as tmp:  # a checkpoint folder is complete or absent
        save_file(tensors, os.path.join(tmp, "state.safetensors"))
        info = {"progress": asdict(progress), "param_groups": opt_state["param_groups"], "meta": meta,
                "sha256": _sha256(os.path.join(tmp, "state.safetensors"))}
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(info, f, indent=1)
    for old in list_checkpoints(work_dir)[keep:]:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def list_checkpoints(work_dir: str) -> list:
    """Checkpoint folder names, newest first."""
    root = os.path.join(work_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if CHECKPOINT_RE.match(n)]
    return sorted(names, key=lambda n: tuple(int(x) for x in CHECKPOINT_RE.match(n).groups()), reverse=True)


def latest_valid_checkpoint(work_dir: str):
    """(folder, info) of the newest checkpoint whose tensors match their recorded hash, or None."""
    for name in list_checkpoints(work_dir):
        folder = os.path.join(work_dir, "checkpoints", name)
        try:
            with open(os.path.join(folder, "state.json")) as f:
                info = json.load(f)
            if _sha256(os.path.join(folder, "state.safetensors")) == info["sha256"]:
                return folder, info
        except (OSError, ValueError, KeyError):
            pass
    return None


def load_training_state(folder: str, info: dict, model, optimizer_for_stage):
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    missing = set(delta_tensors(model)) ^ set(params)
    if missing:
        raise TrainingError(f"checkpoint {folder} does not fit the model: {sorted(missing)[:3]}")
    with torch.no_grad():
        named = dict(model.named_parameters())
        for k, v in params.items():
            named[k].copy_(v)
    optimizer = optimizer_for_stage()
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return optimizer


# --- several processes ---------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params, world: int):
    """Data parallel: every process ends the step with the mean of all processes' gradients."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def average_scalars(values: dict, world: int) -> dict:
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


# --- the loop -----------------------------------------------------------------------------------


def _log(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: str, progress: Progress):
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if (r.get("stage"), r.get("step", 0)) <= (progress.stage, progress.step):
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(keep)


def train(model, corpus, config: TrainConfig, work_dir: str, *, resume: bool = False, meta: dict | None = None,
          show_progress: bool = True):
    """Run (or resume) both stages on a linearized model in place. Returns the Progress.

    Under torch.distributed (torchrun) each of the W processes takes its 1/W share of every batch
    and gradients are averaged, so the run follows the one-process run with the same batch size;
    only rank 0 writes logs and checkpoints."""
    from tqdm import tqdm

    rank, world = dist_info()
    if config.batch_size % world:
        raise TrainingError(f"--batch-size {config.batch_size} is not a multiple of the {world} processes")
    show_progress = show_progress and rank == 0

    meta = {**(meta or {}), "config": {k: getattr(config, k) for k in TrainConfig.IDENTITY},
            "data_fingerprint": corpus.fingerprint(), "recurrence": Recurrence.of(model.lolcats or {}).to_dict()}
    meta["config"]["lora_targets"] = list(config.lora_targets)
    os.makedirs(work_dir, exist_ok=True)
    log_path = os.path.join(work_dir, "metrics.jsonl")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda: no CUDA device is available")
    model.to(device)
    progress = Progress()
    found = latest_valid_checkpoint(work_dir)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank sees the same checkpoints before deciding
    if found and not resume:
        raise TrainingError(f"{work_dir} already holds a training run; pass --resume to continue it "
                            f"or remove the folder to start over")
    if resume and found:
        folder, info = found
        saved = info["meta"]
        # runs from before these settings existed had their defaults
        saved.setdefault("recurrence", Recurrence().to_dict())  # the first models'
        saved["config"].setdefault("stage2_seq_len", 0)
        for key in ("base", "data_fingerprint", "window_size", "feature_dim", "recurrence"):
            if saved.get(key) != meta.get(key):
                raise TrainingError(f"cannot resume: {key} differs from the saved run "
                                    f"({saved.get(key)!r} vs {meta.get(key)!r})")
        for key, value in meta["config"].items():
            if saved["config"].get(key) != value:
                raise TrainingError(f"cannot resume: {key} was {saved['config'].get(key)!r}, now {value!r}")
        progress = Progress(**info["progress"])
        if progress.stage == 2:
            apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                       seed=config.seed)
            model.to(device)
        params = set_trainable(model, progress.stage)
        optimizer = load_training_state(folder, info, model, lambda: make_optimizer(params, config, progress.stage))
        if rank == 0:
            _truncate_log(log_path, progress)
    else:
        if rank == 0 and os.path.exists(log_path):
            os.remove(log_path)
        optimizer = None
        torch.manual_seed(config.seed)  # dropout; a resumed run restores the RNG from its checkpoint

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    model.train()
    for stage in (1, 2):
        n_steps = config.steps(stage)
        if stage < progress.stage:
            continue
        if stage > progress.stage or optimizer is None:
            if stage == 2 and not lora_modules(model):
                apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets,
                           seed=config.seed)
                model.to(device)
            if stage > progress.stage:
                progress.stage, progress.step = stage, 0
            optimizer = make_optimizer(set_trainable(model, stage), config, stage)
        if progress.step >= n_steps:
            continue
        params = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(total=n_steps, initial=progress.step, desc=f"stage {stage}", unit="step", disable=not show_progress,
                   dynamic_ncols=True)
        seq_len = config.stage_seq_len(stage)
        train_data = torch.from_numpy(repack(corpus.train, seq_len))
        tokens_per_step = seq_len * config.batch_size
        stepping = False
        try:
            while progress.step < n_steps:
                idx = batch_indices(len(train_data), stage, progress.step, config.batch_size, config.seed)
                idx = idx.reshape(world, -1)[rank]  # this process's share of the batch
                batch = train_data[torch.from_numpy(idx)].to(device)
                t0, c0 = time.perf_counter(), time.process_time()
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    if stage == 1:
                        parts = {"loss": stage1_step(model, batch, config.mse_weight)}
                    else:
                        parts = stage2_step(model, batch, config.kd, config.kd_weight)
                if world > 1:
                    average_gradients(params, world)
                    parts = average_scalars(parts, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip).item()
                stepping = True  # an interrupt inside optimizer.step could leave half-updated weights
                optimizer.step()
                stepping = False
                dt = time.perf_counter() - t0
                progress.step += 1
                progress.train_seconds += dt
                progress.cpu_seconds += time.process_time() - c0
                progress.tokens[str(stage)] += tokens_per_step
                record = {"stage": stage, "step": progress.step, "tokens": progress.tokens[str(stage)], **parts,
                          "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                          "train_seconds": progress.train_seconds, "cpu_seconds": progress.cpu_seconds}
                if rank == 0:
                    _log(log_path, record)
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4g}", tok_s=f"{tokens_per_step / dt:.0f}")
                if (progress.step % config.save_every == 0 or progress.step == n_steps) and rank == 0:
                    save_training_state(work_dir, model, optimizer, progress, meta)
        except KeyboardInterrupt:
            if not stepping and rank == 0:
                save_training_state(work_dir, model, optimizer, progress, meta)
            bar.close()
            raise
        bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return progress

