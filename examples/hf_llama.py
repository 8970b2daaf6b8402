"""HF transformers with attn_implementation="flash_attention_2" running on flash-attn-plus.

A tiny Llama (GQA, random weights from a config: no download) runs a left-padded batch, which sends HF
through flash_attn_varlen_func (unpad_input / pad_input), once with flash_attention_2 and once with eager
attention; the logits of the real tokens must agree within bf16 tolerance. Needs the flash_attn drop-in
(`pip install ./compat`) and a CUDA GPU (HF offers flash_attention_2 only on CUDA).

    python examples/hf_llama.py [--out result.json]
"""
import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(implementation):
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=implementation, dtype=torch.bfloat16)


def left_padded_batch(device):
    lengths = [37, 64, 5]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    generator = torch.Generator().manual_seed(1)
    for row, length in enumerate(lengths):
        input_ids[row, -length:] = torch.randint(1, 1000, (length,), generator=generator)
        attention_mask[row, -length:] = 1
    return input_ids.to(device), attention_mask.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    eager = tiny_llama("eager").to(args.device).eval()
    flash = tiny_llama("flash_attention_2").to(args.device).eval()
    flash.load_state_dict(eager.state_dict())
    input_ids, attention_mask = left_padded_batch(args.device)
    with torch.no_grad():
        expected = eager(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        got = flash(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    difference = (got - expected)[real].abs()
    scale = expected[real].abs().max().item()
    result = {"implementation": flash.config._attn_implementation, "max_abs_difference": difference.max().item(),
              "mean_abs_difference": difference.mean().item(), "max_abs_logit": scale,
              "argmax_agreement": (got.argmax(-1) == expected.argmax(-1))[real].float().mean().item()}
    # bf16 through 4 layers: differences of a few 1e-2 on logits of magnitude ~1 are rounding.
    result["passed"] = result["max_abs_difference"] <= 0.05 * max(scale, 1.0) and result["argmax_agreement"] >= 0.97
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
