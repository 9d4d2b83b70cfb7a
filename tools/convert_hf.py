"""Convert checkpoints between Hugging Face format and megamod (Megatron dist checkpoint).

    python tools/convert_hf.py hf-to-megamod --hf-dir HF --out CKPT [--dtype bfloat16]
    python tools/convert_hf.py hf-to-megamod --hf-dir QWEN --vision-dir CLIP --out CKPT [--image-token-id N]
    python tools/convert_hf.py megamod-to-hf --ckpt CKPT --out HF

HF is a Qwen2ForCausalLM or a LlavaForConditionalGeneration (Qwen2 text, CLIP vision) directory. With --vision-dir,
a LLaVA model is composed from a CLIP vision checkpoint and a Qwen2 one, with a freshly initialised adapter (the
starting point of the alignment stage). Both directions stream one tensor at a time; the megamod checkpoint loads
at any TP/PP layout.
"""
import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("hf-to-megamod", help="HF safetensors directory -> megamod checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the HF tensors' dtype")
    p.add_argument("--vision-dir", help="CLIP vision checkpoint to compose a LLaVA model with --hf-dir's Qwen2")
    p.add_argument("--image-token-id", type=int, help="with --vision-dir: id of <image> (default: from tokenizer.json)")
    p.add_argument("--vision-feature-layer", type=int, default=-2, help="with --vision-dir: CLIP layer of the features")
    p = sub.add_parser("megamod-to-hf", help="megamod checkpoint -> HF safetensors directory")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-gb", type=float, default=4.0, help="maximum size of one safetensors shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from megamod import distributed
    from megamod.convert.checkpoint import hf_to_megamod, megamod_to_hf

    distributed.initialize(distributed.ParallelConfig())  # conversion builds the whole model on one rank
    if args.direction == "hf-to-megamod":
        hf_to_megamod(args.hf_dir, args.out, args.dtype, args.vision_dir, args.image_token_id,
                      args.vision_feature_layer)
    else:
        megamod_to_hf(args.ckpt, args.out, int(args.shard_gb * 1024**3))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
