#!/usr/bin/env python3
"""OPTIONAL check: spoke's LoRA / full fine-tune snapshots load in Python peft + transformers
and give the same log-probs as `spoke score`.

This check is optional and is not part of `cargo test`: it needs torch, transformers and
peft (a CPU torch wheel is ~200 MB, too heavy for the default CI budget). Run it by hand:

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    pip install transformers peft safetensors tokenizers

    # a LoRA run on the embedded tiny model (the base model lives in DATA/model)
    spoke run --data-dir /tmp/d --max-events 400 --set model.train=lora \
        --set 'model.lora.target_modules=["q_proj","v_proj","up_proj"]'
    SNAP=$(ls -d /tmp/d/snapshots/*/ | tail -1)
    python3 tests/python/check_peft.py --base /tmp/d/model --adapter "$SNAP" \
        --cases tests/data/hf-tiny-llama/cases.jsonl --spoke target/debug/spoke

    # a full fine-tune snapshot is itself a Hugging Face model directory
    python3 tests/python/check_peft.py --base "$FULL_SNAP" --cases ... --spoke ...

What it does: loads the base model with `AutoModelForCausalLM.from_pretrained` (float32,
eager attention), applies the adapter with `PeftModel.from_pretrained` when `--adapter` is
given, computes each case's log-prob with the TRL / SPO convention (prompt and response
tokenized separately without special tokens, concatenated, sum of log_softmax of each response
token given everything before it), runs `spoke score` on the same cases, and fails if any
|difference| exceeds --tol (default 1e-3) or a token count differs. Exit status 0 on success.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile


def torch_logps(base, adapter, cases):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32, attn_implementation="eager")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    out = []
    with torch.no_grad():
        for c in cases:
            p = tok.encode(c["prompt"], add_special_tokens=False).ids
            r = tok.encode(c["response"], add_special_tokens=False).ids
            if not p or not r:
                out.append((0.0 if not r else float("nan"), len(r)))
                continue
            ids = torch.tensor([p + r])
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            n = len(p)
            total = sum(float(lp[n - 1 + j, t]) for j, t in enumerate(r))
            out.append((total, len(r)))
    return out


def spoke_logps(spoke, base, adapter, cases_path):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "scored.jsonl")
        cmd = [spoke, "score", "--model", base, "--input", cases_path, "--output", out]
        if adapter:
            cmd += ["--adapter", adapter]
        subprocess.run(cmd, check=True)
        with open(out, encoding="utf-8") as f:
            return [json.loads(l) for l in f if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="HF model directory (or a full fine-tune snapshot)")
    ap.add_argument("--adapter", help="directory with adapter_model.safetensors + adapter_config.json")
    ap.add_argument("--cases", required=True, help="JSON lines with prompt and response")
    ap.add_argument("--spoke", default="spoke", help="path of the spoke binary")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()

    with open(args.cases, encoding="utf-8") as f:
        cases = [json.loads(l) for l in f if l.strip()]
    ref = torch_logps(args.base, args.adapter, cases)
    got = spoke_logps(args.spoke, args.base, args.adapter, args.cases)
    if len(got) != len(cases):
        print(f"FAILED: spoke scored {len(got)} of {len(cases)} cases")
        return 1
    worst, bad = 0.0, 0
    for c, (lp, n), g in zip(cases, ref, got):
        d = abs(float(g["logp"]) - lp)
        if not math.isfinite(d) or d > args.tol or int(g["n_response_tokens"]) != n:
            bad += 1
            print(f"  diff {d:.3e}  torch {lp:.6f}  spoke {g['logp']:.6f}  prompt={c['prompt'][:40]!r}")
        worst = max(worst, d) if math.isfinite(d) else worst
    print(f"{len(cases)} cases, max abs diff {worst:.3e} (tol {args.tol:g}), {bad} over")
    print("OK" if bad == 0 else "FAILED")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
