"""`lmtrain generate`: sample text from a WORKDIR or a Hugging Face directory, with a KV cache.

The command line around lmtrain.model.decode (batched KV-cache decoding, shared with training's samples,
`lmtrain eval` and `lmtrain serve`): load the model and its tokenizer, encode the prompts (or a chat), print
the generations, or a classifier's class probabilities.

Launch:  lmtrain generate WORKDIR --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data.packing import classify_batch
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.interop.hf_export import _EOS_NAMES, end_of_turn_tokens, workdir_chat_template
from lmtrain.interop.hf_import import load_hf_model, read_hf_labels
from lmtrain.model import T5Config
from lmtrain.model.decode import GenerationError, SamplingConfig, check_sampling, generate
from lmtrain.model.transformer import ModelDef
from lmtrain.paths import as_path, local_dir
from lmtrain.workdir import Workdir, is_hf_dir

# ---------------------------------------------------------------------------------------------- command line


class _Tokenizer:
    """encode/decode over a transformers tokenizer directory or a bare tokenizer.json."""

    def __init__(self, directory):
        self._hf = load_tokenizer(directory)  # lmtrain's one loader: no code from the directory (a DataError)
        self.pad_id = self._hf.pad_token_id
        self.chat_template = getattr(self._hf, "chat_template", None)
        self.eos_id = self._hf.eos_token_id
        if self.eos_id is None:  # a bare tokenizer.json names no EOS: lmtrain's own tokenizers end with one of these
            self.eos_id = next((i for n in _EOS_NAMES if (i := self.token_id(n)) is not None), None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens=False for text that already has them (a rendered chat)."""
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token as a chat template reads them."""
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        return {n: str(getattr(self._hf, n)) for n in names if getattr(self._hf, n, None) is not None}

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids)

    def token_id(self, text: str) -> int | None:
        """The id of `text` when it is one token of the vocabulary (a special token such as <|im_end|>)."""
        return self._hf.get_vocab().get(text)


def load_model(path, which: str | int = "latest"):
    """(model, params, tokenizer dir or None) from a WORKDIR (checkpoint, else the parameters `lmtrain import`
    wrote) or a Hugging Face directory; local or gs://."""
    path = as_path(path)
    if not (path / "config.json").exists():
        raise GenerationError(f"{path} has no config.json; give a WORKDIR or a Hugging Face model directory.")
    if is_hf_dir(path):
        with local_dir(path) as local:
            cfg, params = load_hf_model(local)
        return ModelDef(cfg), params, path
    work = Workdir(path)
    if isinstance(work.model_config(), T5Config):
        raise GenerationError(f"{path} holds an encoder-decoder (model.arch='t5'); lmtrain generate and serve run "
                              "decoder-only models. Score it with lmtrain eval, or export it to transformers.")
    # Sharded over the training mesh when this job's devices fit it (a model larger than one device).
    _, shardings = work.place(command="lmtrain generate")
    params = work.load_params(which, shardings)
    return work.model_def, params, work.tokenizer_dir if work.tokenizer_dir.is_dir() else None


def check_prompts(prompts: list[str]) -> None:
    """A prompt the shell passed as bytes that are not UTF-8 (held as surrogate escapes) cannot be tokenized."""
    for n, prompt in enumerate(prompts, 1):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise GenerationError(f"--prompt number {n} is not valid UTF-8 text (the shell passed bytes that do "
                                  "not decode as UTF-8); give the prompt as UTF-8.") from None


def stop_strings(args: argparse.Namespace, model_path, tokenizer: _Tokenizer) -> list[str]:
    """--stop strings, and for a chat model (a chat template, the training's or the tokenizer's) its end-of-turn
    tokens: a reply ends there, and what follows would be the model writing the user's next turn."""
    template = workdir_chat_template(model_path) or tokenizer.chat_template
    defaults = [] if args.ignore_eos else end_of_turn_tokens(template, tokenizer.token_id)
    return list(dict.fromkeys([*args.stop, *defaults]))


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    cuts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def classify_prompts(model_def: ModelDef, params: dict, prompts: list[list[int]], pad_id: int) -> np.ndarray:
    """[prompts, classes] class probabilities; prompts longer than the model are cut to its positions, as the
    classify task's --too-long truncate does."""
    seq_len = min(max(len(p) for p in prompts), model_def.cfg.max_seq_len)
    batch = classify_batch([(np.asarray(p, np.int32), 0) for p in prompts], seq_len, len(prompts), pad_id)
    logits_BxC = jax.jit(model_def.apply)(params, batch["inputs"], batch["positions"], batch["segment_ids"])
    return np.asarray(jax.nn.softmax(jnp.asarray(logits_BxC, jnp.float32), axis=-1))


def model_labels(path, num_labels: int) -> list[str]:
    """A classifier's class names: WORKDIR/labels.json or a Hugging Face config's id2label (LABEL_i otherwise)."""
    labels = read_hf_labels(path) if is_hf_dir(path) else Workdir(path).labels()
    return labels if labels and len(labels) == num_labels else [f"LABEL_{i}" for i in range(num_labels)]


def print_classes(prompts: list[str], probs_PxC: np.ndarray, labels: list[str], top: int = 10) -> None:
    for prompt, probs in zip(prompts, probs_PxC, strict=True):
        order = np.argsort(-probs)
        print(f"--- {prompt!r}\nlabel: {labels[order[0]]} (p={probs[order[0]]:.3f})")
        for c in order[:top]:
            print(f"  {labels[c]:<20} {probs[c]:.3f}")
        if len(order) > top:
            print(f"  ... {len(order) - top} more classes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmtrain generate", description="Generate text with a KV cache; a "
                                     "classifier prints each prompt's class and the class probabilities.")
    parser.add_argument("path", help="WORKDIR (its checkpoint, or the parameters `lmtrain import` wrote) or an HF dir")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    parser.add_argument("--which", default="latest", help="checkpoint: 'latest', 'best' or a step number")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1.0: off)")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING",
                        help="end a generation at STRING, which is not printed; repeat for several (a chat "
                        "model's end-of-turn token, such as <|im_end|>, is one by default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the full forward pass every step")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate max-new-tokens tokens")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    which = int(args.which) if args.which.isdigit() else args.which
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        prompts = args.prompt or [""]
        check_prompts(prompts)
        if any(not stop for stop in args.stop):
            raise GenerationError("--stop needs a non-empty string.")
        model_def, params, tokenizer_dir = load_model(args.path, which)
        if tokenizer_dir is None:
            raise GenerationError(f"{args.path} has no tokenizer; generation needs one to encode the prompts.")
        tokenizer = _Tokenizer(tokenizer_dir)  # local or gs://
        ids = [tokenizer.encode(p) or [tokenizer.eos_id if tokenizer.eos_id is not None else 0] for p in prompts]
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        head = model_def.cfg.head
        if head == "classify":
            probs = classify_prompts(model_def, params, ids, pad_id)
            print_classes(prompts, probs, model_labels(args.path, model_def.cfg.num_labels))
            return 0
        if head != "lm":
            raise GenerationError(f"{args.path} has a '{head}' head; lmtrain generate runs language models (and "
                                  "classifiers). Score it with lmtrain eval.")
        stops = stop_strings(args, args.path, tokenizer)
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=None if args.ignore_eos else tokenizer.eos_id,
            pad_id=pad_id,
            stop_ids=tuple(i for stop in stops if (i := tokenizer.token_id(stop)) is not None),
        )
        result = generate(model_def, params, ids, sampling, args.seed, use_cache=not args.no_cache)
    except (GenerationError, FileNotFoundError, ValueError) as e:
        print(f"lmtrain generate: error: {e}", file=sys.stderr)
        return 2
    for prompt, new in zip(prompts, result.tokens, strict=True):
        print(f"--- {prompt!r}\n{prompt}{cut_at_stop(tokenizer.decode(new), stops)}")
    print(f"lmtrain generate: {result.new_tokens} tokens in {result.seconds:.2f}s ({result.tokens_per_second:.1f} "
          f"tokens/s, KV cache {'off' if args.no_cache else 'on'}; compiled in {result.compile_seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
