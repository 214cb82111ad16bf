"""Memory of the trainers per process: the model on paper (docs/training.md §9), checked on CPU, evaluated at Wan scale.

    python benchmarks/memory_model.py                  # census, measurements at two tiny sizes, 2-process DDP/FSDP,
                                                       # Wan-1.3B on 8 x 80 GB -> benchmarks/results/memory_model.json
    python benchmarks/memory_model.py --skip-measure   # census and the Wan-1.3B table only

The model (``predict``) adds, per process, the **static** bytes (weights, gradients, Adam states, EMA, critic, teacher,
reference and old-policy copies, frozen text encoder and VAE; sharded ones divided by the FSDP world size) and the
largest **phase** transient: the rollout (KV cache), RAVEN's critic update (its activations and gradients) and the
loss pass (the student's saved activations, then its gradients). Activations are ``coefficients × tokens × width``:

- the coefficients come from a **census** of the tensors autograd saves in one block (``census``), fitted over a grid
  of widths and lengths: per block ``α·T·D + β·T·F + κ·K·D + τ·T`` bytes, ``T`` the tokens of the pass, ``K`` the
  key tokens the grouped block-causal attention gathers with ``torch.cat`` (computed from the model's own attention
  plan, ``attention_groups`` of the interleaved frame mask), plus ``α_root·T·D`` outside the blocks;
- the **check** runs whole training steps of each trainer at two tiny sizes under a ``TorchDispatchMode`` that counts
  the bytes of every live tensor storage (the peak of live tensor memory, what a CUDA allocator's
  ``max_memory_allocated`` reports on a GPU), per phase, and compares them with the prediction; and two processes
  (gloo) under DDP and under FSDP2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, print_table, write_results  # noqa: E402

GB = 1e9
MB = 2**20
#: Bytes of one number of the residual stream between blocks (what a checkpointed block keeps): float32, or bfloat16
#: under autocast (the patch embedding's output dtype).
RESIDUAL_BYTES = {"fp32": 4, "bf16": 2}

# ---------------------------------------------------------------------------------------------------- sizes

#: The two tiny sizes of the check (the unit-test model and the benchmark model), and Wan-1.3B.
SIZES = {
    "tiny": dict(transformer=dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, num_layers=2, text_dim=32,
                                  in_channels=4, freq_dim=16),
                 text_layers=2, height=64, width=64, text_tokens=16),
    "small": dict(transformer=dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4,
                                   text_dim=64, in_channels=16, freq_dim=256),
                  text_layers=2, height=128, width=128, text_tokens=32),
}
WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                in_channels=16, out_channels=16, freq_dim=256, patch_size=(1, 2, 2), rope_max_seq_len=1024,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
#: UMT5-XXL's encoder (Wan's text encoder) and Wan 2.1's VAE, built on the meta device to count their parameters.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


# ---------------------------------------------------------------------------------------------------- live tensor memory
class TensorMemory(TorchDispatchMode):
    """Bytes of the live tensor storages: every storage an op creates inside the mode, plus the ones ``track`` is
    given (weights made before), freed when the storage dies or is resized (FSDP2 frees its unsharded parameters with
    ``UntypedStorage.resize_(0)``, which is no op the mode sees). ``peak`` and the peak inside each named ``phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phases: list[str] = []
        self.phase_peak: dict[str, int] = {}
        self.phase_start: dict[str, int] = {}

    def _storages(self, tensor):
        if is_traceable_wrapper_subclass(tensor):  # DTensor: its local shard
            for name in tensor.__tensor_flatten__()[0]:
                yield from self._storages(getattr(tensor, name))
            return
        with contextlib.suppress(Exception):
            yield tensor.untyped_storage()

    def track(self, tensor: torch.Tensor) -> None:
        for storage in self._storages(tensor):
            key = storage._cdata
            if key in self.live or storage.device.type == "meta":
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self._note()

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_
        tracker = self

        def tracked_resize(storage, size):
            out = resize(storage, size)
            key = storage._cdata
            if key in tracker.live:
                tracker.current += storage.nbytes() - tracker.live[key]
                tracker.live[key] = storage.nbytes()
                tracker._note()
            else:
                tracker.track(torch.empty(0, device=storage.device).set_(storage))
            return out

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def _note(self) -> None:
        self.peak = max(self.peak, self.current)
        if self.phases:
            name = self.phases[-1]
            self.phase_peak[name] = max(self.phase_peak.get(name, 0), self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out

    @contextlib.contextmanager
    def phase(self, name: str):
        self.phases.append(name)
        self.phase_start.setdefault(name, self.current)
        self._note()
        try:
            yield
        finally:
            self.phases.pop()


# ---------------------------------------------------------------------------------------------------- census
def _saved_bytes(output: torch.Tensor, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saved for the backward of ``output`` (weights excluded)."""
    seen: dict[int, int] = {}
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - freed or non-tensor saved values
                continue
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in exclude:
                        seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(seen.values())


def gathered_key_tokens(frames: int, history_frames: int, chunk: int, tokens_per_frame: int,
                        window_frames: int | None = None, sink_frames: int = 0) -> int:
    """``K``: key tokens the grouped block-causal attention concatenates (groups whose visible keys are not one
    contiguous run), from the model's own attention plan."""
    from diffusers_raven.models.attention import attention_groups, block_causal_frame_mask, interleaved_frame_mask

    if history_frames:
        mask = interleaved_frame_mask(frames, history_frames, chunk, window_frames, sink_frames)
    else:
        mask = block_causal_frame_mask(frames, chunk, window_frames, sink_frames)
    return tokens_per_frame * sum(sum(b - a for a, b in runs) for _, _, runs in attention_groups(mask) if len(runs) > 1)


def _census_point(kind: str, heads: int, head_dim: int, ffn: int, layers: int, frames: int, autocast: bool) -> dict:
    from diffusers import WanTransformer3DModel

    from diffusers_raven import CausalWanTransformer3DModel

    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                  out_channels=4, text_dim=32, freq_dim=16, ffn_dim=ffn, num_layers=layers, rope_max_seq_len=64)
    model = (WanTransformer3DModel(**config) if kind == "wan"
             else CausalWanTransformer3DModel(**config, num_frames_per_chunk=3)).train()
    if kind == "causal_lora":  # the adapter of the RL recipes: rank 4 on the attention projections, the rest frozen
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    x, text = torch.randn(1, 4, frames, 8, 8), torch.randn(1, 16, 32)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kind != "wan":
            out = model(x, torch.full((1, frames), 500.0), text, history=torch.randn_like(x)).sample
        else:
            out = model(x, torch.tensor([500.0]), text).sample
    tokens = 16 * (frames if kind == "wan" else 2 * frames - 3)
    gathered = 0 if kind == "wan" else gathered_key_tokens(frames, frames - 3, 3, 16)
    block = sum(p.numel() for n, p in model.blocks[0].named_parameters() if "lora" not in n)
    root = sum(p.numel() for n, p in model.named_parameters() if "lora" not in n) - layers * block
    return dict(bytes=_saved_bytes(out, exclude), T=tokens, D=heads * head_dim, F=ffn, K=gathered, P=block,
                P_root=root)


def census(kind: str, autocast: bool = False) -> dict:
    """Fit the per-block and root activation coefficients (bytes) of ``kind`` (``"causal"``: the interleaved pass of
    :class:`CausalWanTransformer3DModel`; ``"wan"``: the bidirectional ``WanTransformer3DModel`` of the critic) over a
    grid of widths, FFN sizes and lengths; per block = census(2 blocks) − census(1 block)."""
    rows, roots = [], []
    for heads, head_dim, ffn, frames in [(2, 24, 64, 6), (2, 48, 64, 9), (2, 24, 256, 9), (2, 48, 256, 12),
                                         (4, 24, 64, 15), (4, 48, 512, 6), (4, 48, 128, 15), (2, 96, 256, 12),
                                         (4, 64, 512, 9), (2, 24, 512, 15)]:
        one = _census_point(kind, heads, head_dim, ffn, 1, frames, autocast)
        two = _census_point(kind, heads, head_dim, ffn, 2, frames, autocast)
        rows.append({**two, "bytes": two["bytes"] - one["bytes"]})
        roots.append({**one, "bytes": 2 * one["bytes"] - two["bytes"]})
    # Features: tokens × width, tokens × FFN width, gathered keys × width, tokens (norm statistics, attention's
    # log-sum-exp), text tokens × width (cross-attention keys and values; 16 text tokens here) and, under autocast,
    # the block's weights (autocast keeps a bfloat16 copy of every weight a matmul saves).
    names = ["alpha_TD", "beta_TF", "kappa_KD", "tau_T", "sigma_SD"] + (["omega_P"] if autocast else [])
    if kind == "wan":
        names.remove("kappa_KD")
    features = {"alpha_TD": lambda r: r["T"] * r["D"], "beta_TF": lambda r: r["T"] * r["F"],
                "kappa_KD": lambda r: r["K"] * r["D"], "tau_T": lambda r: r["T"], "sigma_SD": lambda r: 16 * r["D"],
                "omega_P": lambda r: r["P"]}
    a = torch.tensor([[features[n](r) for n in names] for r in rows], dtype=torch.float64)
    b = torch.tensor([r["bytes"] for r in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, b).solution
    residual = float(((a @ coef - b).abs() / b).max())
    root_names = ["root_alpha_TD"] + (["root_omega_P"] if autocast else [])
    ra = torch.tensor([[r["T"] * r["D"]] + ([r["P_root"]] if autocast else []) for r in roots], dtype=torch.float64)
    rb = torch.tensor([r["bytes"] for r in roots], dtype=torch.float64)
    root = torch.linalg.lstsq(ra, rb).solution
    root_residual = float(((ra @ root - rb).abs() / rb).max())
    return {**{n: round(float(c), 3) for n, c in zip(names + root_names, [*coef, *root])},
            "max_relative_residual": round(residual, 4), "root_max_relative_residual": round(root_residual, 4)}


def all_coefficients() -> dict:
    return {
        "causal_fp32": census("causal"), "causal_bf16": census("causal", autocast=True),
        "causal_lora_fp32": census("causal_lora"), "causal_lora_bf16": census("causal_lora", autocast=True),
        "wan_fp32": census("wan"), "wan_bf16": census("wan", autocast=True),
    }


# ---------------------------------------------------------------------------------------------------- the model
@dataclass
class Setup:
    """What the memory of one process depends on. Counts of numbers unless named ``*_bytes``."""

    trainer: str                   # "raven" | "cmgrpo" | "kvpo"
    layers: int
    dim: int
    ffn: int
    text_tokens: int
    latent_frames: int
    tokens_per_frame: int
    chunk_frames: int
    student_params: int
    block_params: int              # one WanTransformerBlock (an FSDP unit)
    student_buffer_bytes: int
    frozen_bytes: int              # text encoder + VAE (+ RAVEN's teacher), as loaded
    critic_params: int = 0
    critic_buffer_bytes: int = 0
    lora_params: int = 0           # > 0: LoRA (only these train)
    batch: int = 1                 # per_device_train_batch_size (rows per micro-batch)
    steps_per_generation: int = 1
    ema: bool = True
    reference: bool = False        # a frozen copy of the student (KL with full training)
    old_policy: bool = False       # KVPO's old-policy weights (old_policy_sync_every > 1)
    num_branches: int = 0          # KVPO
    grad_steps: int = 0            # KVPO
    window_frames: int | None = None
    sink_frames: int = 0
    cache_frames: int | None = None  # frames a KVPO rollout cache keeps (window + pool)
    processes: int = 1
    fsdp: bool = False
    checkpointing: bool = False
    precision: str = "fp32"        # activations: "fp32" | "bf16" (autocast)
    kv_bytes: int = 4              # bytes of a cached key/value number
    decode_bytes: float = 0        # peak bytes of decoding one video (VAE + postprocessing), counted on the meta device
    videos_decoded: int = 0        # videos decoded at once for the rewards (RL trainers)
    coefficients: dict = field(default_factory=dict)


def predict(s: Setup) -> dict:
    """Bytes per process by term: ``static`` (all steps long), ``phases`` (transient on top of it) and the peak."""
    shards = s.processes if s.fsdp else 1
    trained = s.lora_params or s.student_params
    static = {
        "student weights": 4 * s.student_params / shards + s.student_buffer_bytes,
        "Adam states": 8 * trained / shards,
        "EMA": 4 * trained / shards if s.ema else 0,
        "frozen models": s.frozen_bytes,
    }
    if s.trainer == "raven":
        static["critic weights + Adam"] = 12 * s.critic_params / shards + s.critic_buffer_bytes
    if s.reference:
        static["reference copy"] = 4 * s.student_params + s.student_buffer_bytes
    if s.old_policy:
        static["old policy"] = 4 * trained / shards
    if s.processes > 1 and not s.fsdp:  # DDP's reducer buckets, for every module accelerate wraps (RAVEN's critic too)
        static["DDP gradient buckets"] = 4 * trained + (4 * s.critic_params if s.trainer == "raven" else 0)
    # FSDP2 all-gathers a block (and prefetches the next) and holds the root's parameters during a pass, in the
    # compute dtype (bfloat16 with accelerate's bf16 mixed precision); the backward holds a block's unsharded gradients.
    param_bytes = RESIDUAL_BYTES[s.precision]
    gather = param_bytes * (2 * s.block_params + (s.student_params - s.layers * s.block_params)) if s.fsdp else 0

    f, n, c, d = s.latent_frames, s.tokens_per_frame, s.chunk_frames, s.dim
    history = f - c
    tokens = (f + history) * n
    gathered = gathered_key_tokens(f, history, c, n, s.window_frames, s.sink_frames)
    prec = s.precision
    root_params = s.student_params - s.layers * s.block_params
    k = s.coefficients[f"causal_lora_{prec}" if s.lora_params else f"causal_{prec}"]
    block = (k["alpha_TD"] * tokens * d + k["beta_TF"] * tokens * s.ffn + k["kappa_KD"] * gathered * d
             + k["tau_T"] * tokens + k["sigma_SD"] * s.text_tokens * d)
    root = k["root_alpha_TD"] * tokens * d
    # autocast's bfloat16 weight copies, saved once per pass whatever its rows (not under FSDP: its mixed precision
    # computes with the gathered bfloat16 parameters, freed after each block)
    omega, root_omega = (0, 0) if s.fsdp else (k.get("omega_P", 0), k.get("root_omega_P", 0))
    copies = omega * s.block_params * s.layers + root_omega * root_params
    if s.checkpointing:  # each block keeps its input (the residual stream); one block is recomputed at a time
        per_row = s.layers * RESIDUAL_BYTES[prec] * tokens * d + block + root
        copies = omega * s.block_params + root_omega * root_params
    else:
        per_row = s.layers * block + root
    rows = s.batch * (s.num_branches * s.grad_steps if s.trainer == "kvpo" else 1)
    phases = {"loss (forward + backward)": {"activations": rows * per_row + copies, "gradients": 4 * trained / shards,
                                            "FSDP unsharded units": gather + (param_bytes * s.block_params if s.fsdp else 0)}}
    generation_rows = s.batch * s.steps_per_generation
    if s.trainer == "kvpo":
        frames = s.cache_frames or f
        kv = 2 * s.layers * 2 * (frames * n + s.text_tokens) * d * s.kv_bytes  # the cache and its fork snapshot
    else:
        frames = f if s.window_frames is None else min(f, s.window_frames - 1)
        kv = generation_rows * s.layers * 2 * (frames * n + s.text_tokens) * d * s.kv_bytes
    phases["rollout"] = {"KV cache": kv, "FSDP unsharded units": gather}
    if s.trainer == "raven":
        w = s.coefficients[f"wan_{prec}"]
        video = f * n
        critic_block = (w["alpha_TD"] * video * d + w["beta_TF"] * video * s.ffn + w["tau_T"] * video
                        + w["sigma_SD"] * s.text_tokens * d)
        critic_root = s.critic_params - s.layers * s.block_params
        omega, root_omega = (0, 0) if s.fsdp else (w.get("omega_P", 0), w.get("root_omega_P", 0))
        if s.checkpointing:  # the trainer checkpoints the critic's blocks too
            critic_pass = generation_rows * (s.layers * RESIDUAL_BYTES[prec] * video * d + critic_block
                                             + w["root_alpha_TD"] * video * d)
            critic_pass += omega * s.block_params + root_omega * critic_root
        else:
            critic_pass = generation_rows * (s.layers * critic_block + w["root_alpha_TD"] * video * d)
            critic_pass += omega * s.block_params * s.layers + root_omega * critic_root
        phases["critic update"] = {"activations": critic_pass,
                                   "gradients": 4 * s.critic_params / shards,
                                   "FSDP unsharded units": gather + (param_bytes * s.block_params if s.fsdp else 0)}
    if s.videos_decoded:
        phases["decoding (rewards)"] = {"VAE decoding": s.videos_decoded * s.decode_bytes}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    static_total = sum(static.values())
    return {"static": static, "static_total": static_total, "phases": phases, "phase_totals": totals,
            "peak": static_total + max(totals.values()), "peak_phase": max(totals, key=totals.get)}


# ---------------------------------------------------------------------------------------------------- tiny runs
def _pipeline(size: str):
    from diffusers import WanTransformer3DModel

    from diffusers_raven import CausalVideoPipeline, CausalWanTransformer3DModel, ConsistencyFlowMatchScheduler
    from diffusers_raven.utils.tiny import build_word_tokenizer, tiny_text_encoder, tiny_vae

    spec = SIZES[size]
    config = dict(patch_size=(1, 2, 2), rope_max_seq_len=1024, **spec["transformer"])
    torch.manual_seed(0)
    tok = build_word_tokenizer()
    pipe = CausalVideoPipeline(
        tokenizer=tok,
        text_encoder=tiny_text_encoder(len(tok), d_model=config["text_dim"], num_layers=spec["text_layers"]),
        transformer=CausalWanTransformer3DModel(**config, out_channels=config["in_channels"], num_frames_per_chunk=3),
        vae=tiny_vae(z_dim=config["in_channels"]),
        scheduler=ConsistencyFlowMatchScheduler(),
    )
    teacher = WanTransformer3DModel(**config, out_channels=config["in_channels"])
    return pipe, teacher


#: The measured variants: (trainer, options).
VARIANTS = {
    "raven": ("raven", {}),
    "raven_checkpointing": ("raven", {"gradient_checkpointing": True}),
    "raven_lora": ("raven", {"lora": True}),
    "cmgrpo": ("cmgrpo", {"beta": 0.04}),
    "cmgrpo_lora": ("cmgrpo", {"lora": True}),
    "kvpo_lora": ("kvpo", {"lora": True}),
}


def build(trainer_kind: str, size: str, output_dir: str, lora: bool = False, distributed: str | None = None,
          **overrides):
    """A trainer of ``trainer_kind`` at ``size`` (21 frames, 2 rows per generation batch; KVPO: 33 frames with a
    window, 2 branches)."""
    from datasets import Dataset
    from peft import LoraConfig

    from diffusers_raven import CMGRPOConfig, CMGRPOTrainer, KVPOConfig, KVPOTrainer, RavenConfig, RavenTrainer

    pipe, teacher = _pipeline(size)
    spec = SIZES[size]
    prompts = Dataset.from_dict({"prompt": ["a red circle moving right", "a blue square moving left",
                                            "a green triangle", "a red square"]})
    # 3 steps: the phases of step 3 (a new generation batch) run with every optimizer state allocated
    common = dict(output_dir=output_dir, max_steps=3, per_device_train_batch_size=1, num_frames=21,
                  height=spec["height"], width=spec["width"], max_sequence_length=spec["text_tokens"],
                  logging_steps=1, save_strategy="no", use_cpu=True, seed=0, report_to=[], ema_decay=0.9)
    if distributed == "fsdp":
        common.update(fsdp="full_shard",
                      fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["WanTransformerBlock"]})
    peft = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]) if lora else None

    def brightness(prompts, videos, **columns):
        return [float(v.mean()) for v in videos]

    if trainer_kind == "raven":
        args = RavenConfig(**{**common, "critic_updates_per_generator_update": 1, **overrides})
        return RavenTrainer(model=pipe, teacher=teacher, args=args, train_dataset=prompts, peft_config=peft)
    if trainer_kind == "cmgrpo":
        args = CMGRPOConfig(**{**common, "num_generations": 2, "steps_per_generation": 2, **overrides})
        return CMGRPOTrainer(model=pipe, reward_funcs=[brightness], args=args, train_dataset=prompts, peft_config=peft)
    args = KVPOConfig(**{**common, "num_frames": 33, "num_branches": 2, "routed_chunks": 1, "selected_frames": 2,
                         "recent_frames": 3, "window_frames": 6, "sink_frames": 0, "pool_frames": 9,
                         "fork_start_chunk": 2, "beta": 0.5, "grad_steps": 2, **overrides})
    return KVPOTrainer(model=pipe, reward_funcs=[brightness], args=args, train_dataset=prompts, peft_config=peft)


class MetaMemory(TensorMemory):
    """:class:`TensorMemory` that also counts meta-device storages: running code on meta tensors counts the bytes it
    would allocate without computing anything."""

    def track(self, tensor: torch.Tensor) -> None:
        for storage in self._storages(tensor):
            key = storage._cdata
            if key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self._note()


@torch.no_grad()
def decode_bytes(vae, latent_shape: tuple[int, ...], video_processor=None) -> int:
    """Peak bytes of decoding one video of ``latent_shape`` ``[C, F, h, w]`` (and postprocessing it as the trainers
    do), counted by running the decoder on the meta device."""
    import copy

    meta = copy.deepcopy(vae).to("meta") if next(vae.parameters()).device.type != "meta" else vae
    mem = MetaMemory()
    with mem:
        pixels = meta.decode(torch.empty(1, *latent_shape, device="meta"), return_dict=False)[0]
        if video_processor is not None:
            video_processor.postprocess_video(pixels, output_type="pt")
    return mem.peak


def _count(module) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def setup_of(trainer, precision: str = "fp32") -> Setup:
    """The :class:`Setup` of a built trainer (sizes counted from its modules)."""
    args, student = trainer.args, trainer.student
    params, buffers = _count(student)
    lora = sum(p.numel() for n, p in student.named_parameters() if "lora" in n)
    block = sum(p.numel() for p in student.blocks[0].parameters())
    pipe = trainer.pipeline
    frozen = sum(sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
                 for m in (pipe.text_encoder, pipe.vae))
    kind = {"RavenTrainer": "raven", "CMGRPOTrainer": "cmgrpo", "KVPOTrainer": "kvpo"}[type(trainer).__name__]
    extra = {}
    if kind == "raven":
        critic_params, critic_buffers = _count(trainer._unwrap(trainer.critic))
        frozen += sum(t.numel() * t.element_size() for t in [*trainer.teacher.parameters(),
                                                             *trainer.teacher.buffers()])
        extra.update(critic_params=critic_params, critic_buffer_bytes=critic_buffers)
    if kind == "kvpo":
        extra.update(num_branches=args.num_branches, grad_steps=args.grad_steps, old_policy=args.old_policy_sync_every > 1,
                     cache_frames=args.pool_frames, videos_decoded=args.num_branches + 1)
    if kind == "cmgrpo":
        extra.update(videos_decoded=args.per_device_train_batch_size * args.steps_per_generation)
    if kind != "raven":
        extra.update(decode_bytes=decode_bytes(pipe.vae, trainer.latent_shape, pipe.video_processor))
    channels, frames, h, w = trainer.latent_shape
    return Setup(
        trainer=kind, layers=len(student.blocks), dim=student.config.num_attention_heads * student.config.attention_head_dim,
        ffn=student.config.ffn_dim, text_tokens=args.max_sequence_length, latent_frames=frames,
        tokens_per_frame=(h // 2) * (w // 2), chunk_frames=pipe.chunk_frames, student_params=params,
        block_params=block, student_buffer_bytes=buffers, frozen_bytes=frozen, lora_params=lora if trainer.peft_config
        else 0, batch=args.per_device_train_batch_size, steps_per_generation=args.steps_per_generation,
        ema=args.ema_decay is not None, reference=getattr(trainer, "ref_model", None) is not None,
        window_frames=args.window_frames, sink_frames=args.sink_frames, processes=args.world_size,
        fsdp=trainer.is_fsdp_enabled, checkpointing=args.gradient_checkpointing, precision=precision, **extra)


def measure(trainer) -> dict:
    """Train the trainer's steps under :class:`TensorMemory`, with the phases marked."""
    from transformers import TrainerCallback

    mem = TensorMemory()

    def mark(obj, name: str, phase: str) -> None:
        method = getattr(obj, name)

        @functools.wraps(method)
        def marked(*args, **kwargs):
            with mem.phase(phase):
                return method(*args, **kwargs)

        setattr(obj, name, marked)

    chunks = trainer.rollout_chunks

    @functools.wraps(chunks)
    def rollout_chunks(*args, **kwargs):  # an iterator: the phase lasts while it is consumed
        iterator = chunks(*args, **kwargs)

        def consumed():
            with mem.phase("rollout"):
                yield from iterator

        return consumed()

    trainer.rollout_chunks = rollout_chunks
    if hasattr(trainer, "rollout_group"):  # KVPO: a prompt's anchor and branches
        mark(trainer, "rollout_group", "rollout")
    if hasattr(trainer, "_critic_update"):
        mark(trainer, "_critic_update", "critic update")
    mark(trainer, "decode_videos", "decoding (rewards)")
    mark(trainer, "_generate", "generation, other (rewards, records)")
    mark(trainer, "training_step", "loss (forward + backward)")

    class Optimizer(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            mem.phases.append("optimizer step")

        def on_optimizer_step(self, *args, **kwargs):
            mem.phases.pop()

    trainer.add_callback(Optimizer())
    modules = [trainer.student, trainer.pipeline.text_encoder, trainer.pipeline.vae]
    modules += [m for m in (getattr(trainer, "teacher", None), getattr(trainer, "critic", None),
                            getattr(trainer, "ref_model", None)) if m is not None]
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            mem.track(tensor)
    if trainer.ema is not None:
        for shadow in trainer.ema.shadow_params:
            mem.track(shadow)
    start = mem.current
    began = time.perf_counter()
    with mem:
        trainer.train()
    return {"start_bytes": start, "peak_bytes": mem.peak, "end_bytes": mem.current,
            "phase_peak_bytes": dict(mem.phase_peak), "seconds": round(time.perf_counter() - began, 1)}


def run_one(name: str, size: str, distributed: str | None = None) -> dict:
    kind, options = VARIANTS[name]
    trainer = build(kind, size, tempfile.mkdtemp(), distributed=distributed, **options)
    setup = setup_of(trainer)
    measured = measure(trainer)
    return {"variant": name, "size": size, "distributed": distributed, "rank": trainer.args.process_index,
            "setup": {k: v for k, v in asdict(setup).items() if k != "coefficients"}, "measured": measured}


def compare(result: dict, coefficients: dict) -> dict:
    """The prediction for a measured run and the measured figures beside it (bytes; phases above the static)."""
    setup = Setup(**result["setup"], coefficients=coefficients)
    predicted = predict(setup)
    measured = result["measured"]
    # The static after the first optimizer step (Adam states exist) is what the phases of step 2 sit on.
    rows = []
    for phase, total in predicted["phase_totals"].items():
        peak = measured["phase_peak_bytes"].get(phase)
        rows.append({"phase": phase, "predicted_bytes": predicted["static_total"] + total,
                     "measured_bytes": peak})
    return {"variant": result["variant"], "size": result["size"], "distributed": result["distributed"],
            "rank": result["rank"], "predicted_peak_bytes": predicted["peak"], "measured_peak_bytes": measured["peak_bytes"],
            "ratio": round(measured["peak_bytes"] / predicted["peak"], 3), "predicted_peak_phase": predicted["peak_phase"],
            "predicted_static_bytes": predicted["static_total"], "phases": rows, "predicted": predicted}


def _subprocess_runs(variants: list[str], sizes: list[str]) -> list[dict]:
    results = []
    for size in sizes:
        for name in variants:
            print(f"   measuring {name} at {size} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", name, "--size", size], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
            if out.returncode:
                raise RuntimeError(f"{name} at {size} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def _distributed_runs(size: str) -> list[dict]:
    results = []
    for mode in ("ddp", "fsdp"):
        print(f"   measuring raven at {size}, 2 processes, {mode} ...", flush=True)
        with tempfile.TemporaryDirectory() as out, socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.close()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), __file__, "--one", "raven", "--size", size,
                   "--distributed", mode, "--out", out]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
            for rank in (0, 1):
                results.append(json.loads(Path(out, f"rank{rank}.json").read_text()))
    return results


# ---------------------------------------------------------------------------------------------------- Wan-1.3B
def _meta_params(build_fn) -> tuple[int, int]:
    with torch.device("meta"):
        module = build_fn()
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params, buffers


def wan_setups(coefficients: dict) -> list[tuple[str, Setup]]:
    """Wan-1.3B (480 × 832: 30 × 52 tokens per latent frame; 512 text tokens) on 8 processes of 80 GB, one video per
    micro-batch and per generation batch on each process, bf16: autocast under DDP (``bf16=True``; the rollouts, outside
    autocast, then cache float32 keys and values), accelerate's bf16 mixed precision under FSDP2. Frozen: UMT5-XXL
    and the teacher in bf16, the VAE in float32. RAVEN: 81 frames (21 latent, 7 chunks), EMA, critic = teacher copy.
    CM-GRPO: 81 frames, beta = 0 (no reference copy), no EMA. KVPO: 93 frames (24 latent), window 12, 3 sinks, pool 35,
    8 branches, grad_steps 2, LoRA only (the reference is the adapter-disabled model)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.video_processor import VideoProcessor
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import UMT5Config, UMT5EncoderModel

    from diffusers_raven import CausalWanTransformer3DModel

    with torch.device("meta"):
        model = CausalWanTransformer3DModel(**WAN_1_3B)
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        block = sum(p.numel() for p in model.blocks[0].parameters())
        inject_adapter_in_model(LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                model)
        lora = sum(v.numel() for v in get_peft_model_state_dict(model).values())
        vae = AutoencoderKLWan()
    text, _ = _meta_params(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)))
    teacher, teacher_buffers = _meta_params(lambda: WanTransformer3DModel(**WAN_1_3B))
    vae_bytes = sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])
    processor = VideoProcessor(vae_scale_factor=8)
    decode = {frames: decode_bytes(vae, (16, frames, 60, 104), processor) for frames in (21, 24)}
    frozen = 2 * text + vae_bytes
    base = dict(layers=30, dim=1536, ffn=8960, text_tokens=512, latent_frames=21, tokens_per_frame=30 * 52,
                chunk_frames=3, student_params=params, block_params=block, student_buffer_bytes=buffers,
                processes=8, precision="bf16", coefficients=coefficients)
    setups = []
    for trainer in ("raven", "cmgrpo", "kvpo"):
        for fsdp in (False, True):
            for use_lora in (False, True):
                if (trainer == "raven" and use_lora) or (trainer == "kvpo" and not use_lora):
                    continue  # RAVEN distils all weights; KVPO's recipe trains an adapter
                for checkpointing in (False, True):
                    extra = dict(trainer=trainer, fsdp=fsdp, checkpointing=checkpointing, kv_bytes=2 if fsdp else 4,
                                 lora_params=lora if use_lora else 0, frozen_bytes=frozen)
                    if trainer == "raven":
                        extra.update(frozen_bytes=frozen + 2 * teacher + teacher_buffers, critic_params=teacher,
                                     critic_buffer_bytes=teacher_buffers)
                    if trainer == "cmgrpo":
                        extra.update(ema=False, videos_decoded=1, decode_bytes=decode[21])
                    if trainer == "kvpo":
                        extra.update(latent_frames=24, window_frames=12, sink_frames=3, num_branches=8, grad_steps=2,
                                     cache_frames=35, ema=False, videos_decoded=9, decode_bytes=decode[24])
                    name = (f"{trainer} {'FSDP x8' if fsdp else 'DDP'} {'LoRA r32' if use_lora else 'full'} "
                            f"{'AC' if checkpointing else 'no AC'}")
                    setups.append((name, Setup(**{**base, **extra})))
    return setups


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-measure", action="store_true", help="census and the Wan-1.3B table only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--distributed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.one:
        result = run_one(a.one, a.size, a.distributed)
        if a.out:
            Path(a.out, f"rank{result['rank']}.json").write_text(json.dumps(result))
        else:
            print(json.dumps(result))
        return

    started = time.perf_counter()
    header("memory model: census, tiny measurements, Wan-1.3B")
    coefficients = all_coefficients()
    print("census (bytes per unit; per block unless root_*):")
    for name, values in coefficients.items():
        print(f"   {name}: {values}")
    checks = []
    if not a.skip_measure:
        measured = _subprocess_runs(list(VARIANTS), list(SIZES)) + _distributed_runs("small")
        checks = [compare(r, coefficients) for r in measured]
        print_table(["variant", "size", "mode", "rank", "predicted MB", "measured MB", "measured / predicted",
                     "predicted peak phase"],
                    [[c["variant"], c["size"], c["distributed"] or "1 process", c["rank"],
                      c["predicted_peak_bytes"] / MB, c["measured_peak_bytes"] / MB, c["ratio"],
                      c["predicted_peak_phase"]] for c in checks])
        print_table(["variant", "size", "mode", "rank", "phase", "predicted MB", "measured MB"],
                    [[c["variant"], c["size"], c["distributed"] or "1 process", c["rank"], row["phase"],
                      row["predicted_bytes"] / MB, (row["measured_bytes"] or 0) / MB]
                     for c in checks for row in c["phases"]])
    wan = []
    for name, setup in wan_setups(coefficients):
        prediction = predict(setup)
        wan.append({"setup": name, "static_GB": {k: round(v / GB, 2) for k, v in prediction["static"].items()},
                    "phase_GB": {k: round(v / GB, 2) for k, v in prediction["phase_totals"].items()},
                    "peak_GB": round(prediction["peak"] / GB, 1), "peak_phase": prediction["peak_phase"],
                    "fits_80GB": prediction["peak"] <= 80 * GB})
    print_table(["Wan-1.3B, per GPU", "static GB", "peak GB", "peak phase", "fits 80 GB"],
                [[w["setup"], round(sum(w["static_GB"].values()), 1), w["peak_GB"], w["peak_phase"], w["fits_80GB"]]
                 for w in wan])
    write_results("memory_model", {"coefficients": coefficients, "checks": checks, "wan_1_3b": wan}, started)


if __name__ == "__main__":
    main()
