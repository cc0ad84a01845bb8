"""fxdiff across Hugging Face architectures: no false alarm on a model compared with itself, in
float32, cast to bfloat16 or float16, and under bfloat16 autocast.

    PYTHONPATH=. python benchmarks/architectures.py [--models llama,bert,...]

Each architecture is built from a tiny config with random weights (nothing downloaded), captured
(streamed to disk, as ``fxdiff capture`` does) and compared live with a fresh build of itself: in
float32 the verdict must be ``match``, cast to bfloat16 ``within noise``; cast to float16 too, unless
float16 itself fails (a gradient that overflows to inf, a weight lost to its subnormals), which the
first divergence then names; under bfloat16 autocast ``within noise``. One row per architecture,
then the totals that go in the README. Not here: RWKV, whose eval-mode forward writes its recurrent
state in place after saving it for backward (its backward fails in eager too; fxdiff says so, exit 2).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import transformers  # noqa: E402

import fxdiff  # noqa: E402

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
T5 = dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=128)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
             vocab_size=32)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8, num_channels=3)
STAGES = dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])

# model type -> (config overrides on top of its family's, family: the inputs it takes)
ARCHITECTURES = {
    **{t: ({}, "text") for t in ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt_neox", "opt", "falcon",
                                 "olmo", "stablelm", "starcoder2", "granite", "cohere", "persimmon", "bert", "roberta",
                                 "deberta-v2", "electra", "distilbert", "mpnet", "xlm-roberta")},
    **{t: (dict(head_dim=16), "text") for t in ("gemma", "gemma2", "gemma3_text")},
    "gptj": (dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64), "text"),
    "codegen": (dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=64), "text"),
    "gpt_neo": (dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=16), "text"),
    "bloom": (dict(n_layer=2, n_head=2), "text"),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), "text"),
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32), "text"),
    "albert": (dict(embedding_size=32), "text"),
    "mobilebert": (dict(embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                        num_feedforward_networks=1), "text"),
    "mamba": (dict(state_size=8, expand=2, conv_kernel=4), "text"),
    **{t: (SEQ2SEQ, "seq2seq") for t in ("bart", "mbart", "pegasus")},
    **{t: (T5, "seq2seq") for t in ("t5", "mt5", "longt5")},
    **{t: ({}, "vision") for t in ("vit", "deit", "beit", "dinov2")},
    "swin": (dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2, patch_size=4), "vision"),
    "convnext": (dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2), "vision"),
    "resnet": (STAGES, "vision"),
    "regnet": (dict(STAGES, groups_width=8), "vision"),
    "segformer": (dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2]), "vision"),
    "mobilevit": (dict(hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32]), "vision"),
    "levit": (dict(hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8],
                   patch_size=16), "vision"),
    "poolformer": (dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_encoder_blocks=4), "vision"),
    **{t: ({}, "audio") for t in ("wav2vec2", "hubert", "wavlm", "data2vec-audio")},
    "sew": (dict(squeeze_factor=2), "audio"),
    "whisper": (dict(SEQ2SEQ, encoder_layers=1, decoder_layers=1, num_mel_bins=16, max_source_positions=16,
                     max_target_positions=32, decoder_start_token_id=1), "speech2seq"),
}
FAMILY = {"text": TEXT, "seq2seq": {}, "vision": VISION, "audio": AUDIO, "speech2seq": {}}


def build(model_type: str) -> torch.nn.Module:
    """The architecture's base model from a tiny config, random weights from a fixed seed, eval mode."""
    overrides, family = ARCHITECTURES[model_type]
    config_class = transformers.CONFIG_MAPPING[model_type]
    accepted = inspect.signature(config_class.__init__).parameters
    config = config_class(**{k: v for k, v in {**FAMILY[family], **overrides}.items()
                             if k in accepted or k in overrides})
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def inputs(model_type: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    family = ARCHITECTURES[model_type][1]
    if family == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if family == "audio":
        return {"input_values": torch.randn(2, 800, generator=g)}
    if family == "speech2seq":
        return {"input_features": torch.randn(2, 16, 32, generator=g),
                "decoder_input_ids": torch.randint(3, 128, (2, 6), generator=g)}
    ids = {"input_ids": torch.randint(3, 128, (2, 12), generator=g)}
    if family == "seq2seq":
        ids["decoder_input_ids"] = torch.randint(3, 128, (2, 7), generator=g)
    return ids


def run(model_type: str, work: str) -> dict:
    row = {"model": model_type}
    try:
        out = os.path.join(work, f"{model_type}.fxd")
        fxdiff.capture(build(model_type), kwargs=inputs(model_type), stream_to=out)
        row["fp32"] = fxdiff.compare(out, build(model_type)).verdict
        row["bf16"] = fxdiff.compare(out, build(model_type).to(torch.bfloat16)).verdict
        row["autocast"] = fxdiff.compare(out, build(model_type), autocast="bfloat16").verdict
        fp16 = fxdiff.compare(out, build(model_type).to(torch.float16))
        row["fp16"] = fp16.verdict
        if fp16.diverged:
            first = fp16.first_divergence()
            said = [f"{d} {e['op']} in {e['ref_module'] or '<root>'}" for d in first for e in first[d][:1]]
            bad = [p for p in fp16.params if p.grad is not None and not p.grad.passed]
            if bad:
                said.append(f"{len(bad)} parameter gradients ({bad[0].grad.note or 'past the noise'})")
            row["fp16 first"] = "; ".join(said)
    except Exception as e:  # noqa: BLE001 -- a row, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(ARCHITECTURES))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    t0, rows = time.time(), []
    print(f"{'architecture':16} {'float32':13} {'bfloat16':13} {'bf16 autocast':13} {'float16':13} why not")
    with tempfile.TemporaryDirectory() as work:
        for name in a.models.split(","):
            row = run(name, work)
            rows.append(row)
            print(f"{name:16} {row.get('fp32', '-'):13} {row.get('bf16', '-'):13} {row.get('autocast', '-'):13} "
                  f"{row.get('fp16', '-'):13} "
                  f"{row.get('error', row.get('fp16 first', ''))}", flush=True)
    fp32 = sum(r.get("fp32") == "match" for r in rows)
    bf16 = sum(r.get("bf16") == "within noise" for r in rows)
    fp16 = sum(r.get("fp16") == "within noise" for r in rows)
    autocast = sum(r.get("autocast") == "within noise" for r in rows)
    print(f"\n{len(rows)} architectures: float32 'match' {fp32}/{len(rows)}; bfloat16 'within noise' {bf16}/{len(rows)}; "
          f"bfloat16 autocast 'within noise' {autocast}/{len(rows)}; float16 'within noise' {fp16}/{len(rows)}; errors {sum('error' in r for r in rows)}; {time.time() - t0:.0f} s")
    return 0 if fp32 == bf16 == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
