#!/usr/bin/env python3
"""Write the Hugging Face fixtures under tests/fixtures/hf/ with the reference library.

Run:  TOKENIZERS_PARALLELISM=false python3 scripts/make_hf_fixtures.py
      (needs torch, transformers, tokenizers, safetensors, peft; CPU only, no network)
Every file is committed; neither CI nor `cargo test` needs Python. The output is byte for byte
the same on every run with the same library versions (fixed seeds, deterministic torch, sorted
JSON keys); tests/fixtures/hf/README.md says what each file holds and which versions wrote them.

What it writes:
- tokenizer/tokenizer.json: a byte-level BPE trained with `tokenizers` on the "text" fields of
  data/corpus/corpus.jsonl, 413 learned entries (256 bytes + merges) and 7 added special tokens
  appended after them (420 in all; not a multiple of 64, so topcoat pads the vocab).
- tokenizer/corpus_ids.json: the ids of the whole corpus under that tokenizer.
- gpt2/, llama/, llama_mqa_bf16/, qwen2/, mistral/: tiny random-init models written by
  `save_pretrained`, each with the tokenizer (tokenizer.json + tokenizer_config.json, the chat
  template inside tokenizer_config.json where the model has one) and reference.safetensors:
  the reference library's float64 logits, loss and greedy tokens, computed from the model as
  `from_pretrained` reads it back from the directory (so the stored weights are exactly what
  the reference saw, after rounding to bf16/f16 where the model is stored so).
- peft_llama/, peft_gpt2/: LoRA adapters (r=4, lora_alpha=8, random non-zero A and B) on every
  projection of llama/ and gpt2/, written by PEFT's `save_pretrained`, with
  reference.safetensors: the PeftModel's float64 logits, loss and greedy tokens on the base
  fixture's input ids.
- chat/llama.json, chat/qwen2.json: `apply_chat_template` renders, ids, assistant spans and the
  assistant-only loss mask for a set of conversations.
"""

import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import types

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "corpus.jsonl")
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LEARNED_VOCAB = 413  # 256 byte symbols + 157 merges; the special tokens come after

# Meta-Llama-3-8B-Instruct's template: bos once, header per message, content trimmed, <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Qwen2.5-Instruct's ChatML template, tool calls included (the fixtures use none).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Shared tiny shape: hidden 64, 2 layers, 4 heads of 16, SwiGLU 96, 64 positions.
HIDDEN, LAYERS, HEADS, INTER, POSITIONS = 64, 2, 4, 96, 64
BATCH, SEQ = 2, 12
PROMPT, NEW_TOKENS = 5, 6


def write_json(path, obj):
    """Sorted keys, one space indent, lists of plain numbers kept on one line."""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)
    text = re.sub(
        r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")


def corpus_texts():
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover the leading space of " word" tokens, so a token's span
    # is exactly the text it encodes (the chat masks rely on it).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=LEARNED_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == LEARNED_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
         for t in SPECIAL_TOKENS]
    )
    assert tok.get_vocab_size() == LEARNED_VOCAB + len(SPECIAL_TOKENS)
    return tok


def tokenizer_fixtures(tok, texts):
    d = os.path.join(OUT, "tokenizer")
    os.makedirs(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    h = hashlib.sha256()
    lengths = []
    first = []
    non_ascii = []
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        h.update(struct.pack("<%dI" % len(ids), *ids))
        lengths.append(len(ids))
        if i < 20:
            first.append({"text": text, "ids": ids})
        if any(ord(c) > 127 for c in text):
            non_ascii.append({"line": i, "text": text, "ids": ids})
    write_json(
        os.path.join(d, "corpus_ids.json"),
        {
            "corpus": "data/corpus/corpus.jsonl",
            "lines": len(texts),
            "count": sum(lengths),
            "sha256": h.hexdigest(),
            "line_lengths": lengths,
            "first_lines": first,
            "non_ascii_lines": non_ascii,
            "vocab_size": tok.get_vocab_size(),
            "special_tokens": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        },
    )


def save_tokenizer(tok, d, bos, eos, pad, template):
    kw = {"tokenizer_object": tok, "bos_token": bos, "eos_token": eos, "pad_token": pad}
    if template is not None:
        kw["chat_template"] = template
    fast = PreTrainedTokenizerFast(**kw)
    fast.model_max_length = POSITIONS
    # save_jinja_files=False: the template goes into tokenizer_config.json as in the published
    # Llama 3 and Qwen2.5 checkpoints (the library's default would write chat_template.jinja).
    fast.save_pretrained(d, save_jinja_files=False)


# ------------------------------------------------------------------- models


def randomize(model, seed):
    """Overwrite every parameter with seeded values of a useful size: matrices ~ N(0, 1/C) so
    logits are O(1), norm weights U(0.5, 1.5) (not the ones they init to, so a swapped or
    missing norm shows), biases N(0, 0.1) (not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 2:
                std = 0.3 if ("embed" in name or "wte" in name or "wpe" in name) else HIDDEN ** -0.5
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
            else:
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)


def rmsnorm_f64(self, x):
    """The library's RMSNorm without its float32 round trip (it computes in float32 even in a
    float64 model); the reference wants float64 throughout except RoPE's cos/sin."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def load_reference_model(d, f64_norms):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="sdpa")
    model.eval()
    if f64_norms:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = types.MethodType(rmsnorm_f64, m)
    return model


def read_weights(d):
    w = {}
    for fn in sorted(os.listdir(d)):
        if fn.startswith("model") and fn.endswith(".safetensors"):
            with safe_open(os.path.join(d, fn), "pt") as f:
                for k in f.keys():
                    w[k] = f.get_tensor(k).to(torch.float64)
    return w


def rope_inv_freq_f32(cfg, hs):
    """RoPE inverse frequencies in float32, step by step as topcoat's
    `LlamaShape::rope_inv_freq` computes them (numpy float32 scalars)."""
    rope = cfg.rope_parameters
    base = np.float32(rope["rope_theta"])
    freqs = [np.float32(1.0) / base ** (np.float32(2 * i) / np.float32(hs)) for i in range(hs // 2)]
    if rope.get("rope_type") == "llama3":
        factor, low, high = (np.float32(rope[k]) for k in
                             ("factor", "low_freq_factor", "high_freq_factor"))
        old = np.float32(rope["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old / low, old / high
        out = []
        for f in freqs:
            wavelen = np.float32(2.0) * np.float32(math.pi) / f
            if wavelen > low_wavelen:
                f = f / factor
            elif wavelen >= high_wavelen:
                smooth = (old / wavelen - low) / (high - low)
                f = (np.float32(1.0) - smooth) * f / factor + smooth * f
            out.append(np.float32(f))
        freqs = out
    return torch.tensor(np.array(freqs, dtype=np.float32))


def plain_llama_logits(d, cfg, ids, w=None):
    """The Llama-family forward written out in plain float64 torch from the stored tensors (or
    `w`), in topcoat's layout (q|k|v and gate|up fused), RoPE angles and cos/sin in float32."""
    w = read_weights(d) if w is None else w
    C, NH, NKV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hs, eps, B, T = C // NH, cfg.rms_norm_eps, ids.shape[0], ids.shape[1]

    def norm(x, wt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wt

    inv = rope_inv_freq_f32(cfg, hs)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).double()
    sin = torch.cat([ang.sin(), ang.sin()], -1).double()

    def rope(x):  # [B, heads, T, hs], rotate-half
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(cfg.num_hidden_layers):
        p = "model.layers.%d." % l
        a = p + "self_attn."
        qkv_w = torch.cat([w[a + n + "_proj.weight"] for n in "qkv"], 0)
        h = norm(x, w[p + "input_layernorm.weight"])
        qkv = h @ qkv_w.T
        if a + "q_proj.bias" in w:
            qkv = qkv + torch.cat([w[a + n + "_proj.bias"] for n in "qkv"], 0)
        q, k, v = qkv.split([NH * hs, NKV * hs, NKV * hs], -1)
        q = rope(q.view(B, T, NH, hs).transpose(1, 2))
        k = rope(k.view(B, T, NKV, hs).transpose(1, 2))
        v = v.view(B, T, NKV, hs).transpose(1, 2)
        kv_of = torch.arange(NH) // (NH // NKV)
        att = (q @ k[:, kv_of].transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v[:, kv_of]).transpose(1, 2).reshape(B, T, C)
        x = x + y @ w[a + "o_proj.weight"].T
        m = p + "mlp."
        gate_up = torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]], 0)
        gu = norm(x, w[p + "post_attention_layernorm.weight"]) @ gate_up.T
        g, u = gu.chunk(2, -1)
        x = x + (torch.nn.functional.silu(g) * u) @ w[m + "down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def reference(d, vocab, seed, expect_theta=None):
    """float64 logits, loss and greedy tokens of the model as read back from `d`."""
    model = load_reference_model(d, f64_norms=True)
    cfg = model.config
    if expect_theta is not None:  # the legacy config's top-level rope_theta was read
        assert cfg.rope_parameters["rope_theta"] == expect_theta, cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.float64 and logits.shape == (BATCH, SEQ, vocab)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        assert loss.dtype == torch.float64
        if cfg.model_type != "gpt2":
            # topcoat's float32 inverse frequencies are the library's, bit for bit.
            hs = cfg.hidden_size // cfg.num_attention_heads
            lib = model.model.rotary_emb.inv_freq.to(torch.float32)
            assert torch.equal(lib, rope_inv_freq_f32(cfg, hs)), (d, lib)
            plain = plain_llama_logits(d, cfg, ids)
            err = ((plain - logits).abs().max() / logits.abs().max()).item()
            assert err < 1e-12, (d, err)
        # The library as it ships: RMSNorm in float32, loss upcast to float32.
        stock = load_reference_model(d, f64_norms=False)
        out = stock(input_ids=ids, labels=ids)
        stock_err = ((out.logits - logits).abs().max() / logits.abs().max()).item()
        assert stock_err < 1e-5, (d, stock_err)
        print("%s: stock library logits differ by %.1e (max abs / max abs)"
              % (os.path.basename(d), stock_err), file=sys.stderr)
        loss_hf = out.loss
        assert abs(loss_hf.item() - loss.item()) < 1e-6 * loss.item(), (loss_hf, loss)
        prompt = ids[:1, :PROMPT]
        greedy = None
        for mdl in (model, stock):
            gen = mdl.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
            assert greedy is None or torch.equal(gen[0, PROMPT:], greedy), (greedy, gen)
            greedy = gen[0, PROMPT:]
        # Plain argmax without a cache must agree (and min_new_tokens must not have fired).
        seq = prompt
        for _ in range(NEW_TOKENS):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(seq[0, PROMPT:], greedy), (seq, greedy)
    save_file(
        {
            "input_ids": ids.clone(),
            "logits": logits.contiguous(),
            "loss": loss.reshape(1).contiguous(),
            "loss_hf": loss_hf.reshape(1).to(torch.float64).contiguous(),
            "prompt_ids": prompt[0].clone(),
            "greedy": greedy.clone(),
        },
        os.path.join(d, "reference.safetensors"),
        # One key only: safetensors writes its metadata map in hash order, which varies by run.
        metadata={"written_by": "transformers %s, torch %s" % (
            transformers.__version__, torch.__version__.split("+")[0])},
    )


def legacy_config(d):
    """Rewrite config.json the way transformers 4.x wrote it (top-level rope_theta and
    rope_scaling, torch_dtype): published checkpoints mostly look like this."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    assert rope.pop("rope_type") == "default" and not rope, rope
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.45.0"
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_model(name, cls, config, dtype, seed, tok, tokcfg, shard=None, after=None,
               expect_theta=None):
    d = os.path.join(OUT, name)
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed)
    model = model.to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kw)
    if after:
        after(d)
    save_tokenizer(tok, d, **tokcfg)
    reference(d, config.vocab_size, seed + 1, expect_theta)


def models_fixtures(tok):
    vocab = tok.get_vocab_size()
    sid = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eot = sid["<|endoftext|>"]
    llama_tok = dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|endoftext|>",
                     template=LLAMA3_TEMPLATE)
    qwen_tok = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN25_TEMPLATE)
    plain_tok = dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, template=None)
    llama_common = dict(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=POSITIONS,
        rms_norm_eps=1e-5, bos_token_id=sid["<|begin_of_text|>"], eos_token_id=sid["<|eot_id|>"],
        pad_token_id=eot,
    )

    make_model(
        "gpt2", GPT2LMHeadModel,
        GPT2Config(vocab_size=vocab, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                   n_head=HEADS, bos_token_id=eot, eos_token_id=eot),
        torch.float32, 1000, tok, plain_tok)
    make_model(
        "llama", LlamaForCausalLM,
        LlamaConfig(**llama_common, num_key_value_heads=2, tie_word_embeddings=False,
                    rope_theta=10000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 32}),
        torch.float32, 2000, tok, llama_tok, shard="200KB")
    make_model(
        "llama_mqa_bf16", LlamaForCausalLM,
        LlamaConfig(**llama_common, num_key_value_heads=1, tie_word_embeddings=True,
                    rope_theta=500000.0),
        torch.bfloat16, 3000, tok, llama_tok, after=legacy_config, expect_theta=500000.0)
    make_model(
        "qwen2", Qwen2ForCausalLM,
        Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=INTER,
                    max_position_embeddings=POSITIONS, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, rope_theta=1000000.0,
                    bos_token_id=eot, eos_token_id=sid["<|im_end|>"], pad_token_id=eot),
        torch.float16, 4000, tok, qwen_tok)
    make_model(
        "mistral", MistralForCausalLM,
        MistralConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=INTER,
                      max_position_embeddings=POSITIONS, rms_norm_eps=1e-5, sliding_window=None,
                      tie_word_embeddings=False, rope_theta=10000.0,
                      bos_token_id=eot, eos_token_id=eot),
        torch.float32, 5000, tok, plain_tok)


# --------------------------------------------------------------------- PEFT

PEFT_RANK, PEFT_ALPHA = 4, 8
PEFT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # GPT-2's two c_proj modules told apart by their parent.
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
}


def randomize_lora(model, seed):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's own init range), B ~ N(0, 0.2^2) instead of
    PEFT's zeros, so the adapters change the logits by about their own size (the script
    prints by how much)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                bound = p.shape[1] ** -0.5
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


def merged_weights(base, d):
    """The base's stored tensors with every adapter in d merged, in float64, written out from
    the files: W += (alpha / r) * B @ A, transposed for GPT-2's [in, out] Conv1D weights."""
    w = read_weights(os.path.join(OUT, base))
    prefix, scale = "base_model.model.", PEFT_ALPHA / PEFT_RANK
    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        ad = {k: f.get_tensor(k).to(torch.float64) for k in f.keys()}
    for k in sorted(ad):
        if k.endswith(".lora_A.weight"):
            module = k[len(prefix):-len(".lora_A.weight")]
            delta = scale * ad[prefix + module + ".lora_B.weight"] @ ad[k]
            w[module + ".weight"] += delta.T if base == "gpt2" else delta
    assert len(ad) == 2 * len(PEFT_TARGETS[base]) * LAYERS, sorted(ad)
    return w


def peft_reference(d, base):
    """float64 logits, loss and greedy tokens of the PeftModel of the base model and the
    adapter as read back from d, on the base fixture's input ids."""
    base_dir = os.path.join(OUT, base)
    with safe_open(os.path.join(base_dir, "reference.safetensors"), "pt") as f:
        ids, base_logits = f.get_tensor("input_ids"), f.get_tensor("logits")
    model = PeftModel.from_pretrained(load_reference_model(base_dir, f64_norms=True), d)
    model.eval()
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.float64 for p in lora)
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.float64 and logits.shape == (BATCH, SEQ, vocab)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        moved = ((logits - base_logits).abs().max() / base_logits.abs().max()).item()
        assert moved > 0.1, (d, moved)
        # The same logits from the base model with the adapters merged into its tensors, from
        # the files alone (for the Llama family also through the plain forward).
        w = merged_weights(base, d)
        merged = load_reference_model(base_dir, f64_norms=True)
        missing, unexpected = merged.load_state_dict(w, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        err = ((merged(input_ids=ids).logits - logits).abs().max() / logits.abs().max()).item()
        assert err < 1e-12, (d, err)
        if base != "gpt2":
            plain = plain_llama_logits(base_dir, merged.config, ids, w)
            err = ((plain - logits).abs().max() / logits.abs().max()).item()
            assert err < 1e-12, (d, err)
        stock = PeftModel.from_pretrained(load_reference_model(base_dir, f64_norms=False), d)
        stock.eval()
        out = stock(input_ids=ids, labels=ids)
        stock_err = ((out.logits - logits).abs().max() / logits.abs().max()).item()
        assert stock_err < 1e-5, (d, stock_err)
        print("%s: the adapters move the logits by %.2f of their size; stock library differs "
              "by %.1e" % (os.path.basename(d), moved, stock_err), file=sys.stderr)
        loss_hf = out.loss
        assert abs(loss_hf.item() - loss.item()) < 1e-6 * loss.item(), (loss_hf, loss)
        prompt = ids[:1, :PROMPT]
        greedy = None
        for mdl in (model, stock):
            gen = mdl.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
            assert greedy is None or torch.equal(gen[0, PROMPT:], greedy), (greedy, gen)
            greedy = gen[0, PROMPT:]
        seq = prompt
        for _ in range(NEW_TOKENS):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(seq[0, PROMPT:], greedy), (seq, greedy)
    save_file(
        {
            "input_ids": ids.clone(),
            "logits": logits.contiguous(),
            "loss": loss.reshape(1).contiguous(),
            "loss_hf": loss_hf.reshape(1).to(torch.float64).contiguous(),
            "prompt_ids": prompt[0].clone(),
            "greedy": greedy.clone(),
        },
        os.path.join(d, "reference.safetensors"),
        metadata={"written_by": "peft %s, transformers %s, torch %s" % (
            peft.__version__, transformers.__version__, torch.__version__.split("+")[0])},
    )


def peft_fixture(name, base, dropout, seed):
    d = os.path.join(OUT, name)
    gpt2 = base == "gpt2"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(OUT, base), dtype=torch.float32)
    # What PEFT records as base_model_name_or_path (the absolute path would vary by machine).
    model.name_or_path = "tests/fixtures/hf/" + base
    config = LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_ALPHA, lora_dropout=dropout,
                        target_modules=PEFT_TARGETS[base], fan_in_fan_out=gpt2,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    randomize_lora(model, seed)
    model.save_pretrained(d)
    # The model card is 5 KB of placeholders.
    os.remove(os.path.join(d, "README.md"))
    # PEFT keeps target_modules as a set and writes it in hash order, which varies by run:
    # rewrite the file as PEFT writes it (indent 2, sorted keys) with the list sorted.
    path = os.path.join(d, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    assert sorted(cfg["target_modules"]) == sorted(PEFT_TARGETS[base]), cfg
    cfg["target_modules"] = sorted(cfg["target_modules"])
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))
    peft_reference(d, base)


def peft_fixtures():
    peft_fixture("peft_llama", "llama", 0.1, 6000)
    peft_fixture("peft_gpt2", "gpt2", 0.0, 7000)


# --------------------------------------------------------------------- chat

CONVERSATIONS = [
    ("system_user_assistant", [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is an earthman?"},
        {"role": "assistant", "content": "An inhabitant of the earth."},
    ]),
    ("multi_turn", [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Name a kind of shipping."},
        {"role": "assistant", "content": "Moving goods by sea is shipping."},
        {"role": "user", "content": "And another word for it?"},
        {"role": "assistant", "content": "Transportation."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]),
    ("empty_assistant", [
        {"role": "system", "content": "Say nothing at first."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Now say something."},
        {"role": "assistant", "content": "Something."},
    ]),
    ("unicode", [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": "Qu'est-ce qu'un 地球人? 🌍🙂"},
        {"role": "assistant", "content": "Un habitant de la Terre — naïf, peut-être 👍🏽✨."},
    ]),
    ("no_system", [
        {"role": "user", "content": "Define tellurian."},
        {"role": "assistant", "content": "Of or relating to the earth."},
        {"role": "user", "content": "Use it in a sentence."},
        {"role": "assistant", "content": "The tellurian crust is thin."},
    ]),
    ("whitespace", [
        {"role": "user", "content": "  padded question  \n"},
        {"role": "assistant", "content": "\n  indented answer\n\nwith a blank line  "},
    ]),
]


def byte_offsets(text):
    """char index -> utf-8 byte index, for every index 0..=len(text)."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8")))
    return out


def render(tk, messages, gen):
    return tk.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def token_ids(tk, messages, gen):
    r = tk.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if not isinstance(r, list):
        r = r["input_ids"]
    return list(r)


def chat_fixtures():
    d = os.path.join(OUT, "chat")
    os.makedirs(d)
    for name in ("llama", "qwen2"):
        tk = AutoTokenizer.from_pretrained(os.path.join(OUT, name))
        convs = []
        for cname, msgs in CONVERSATIONS:
            assert msgs[-1]["role"] == "assistant"
            text = render(tk, msgs, False)
            ids = token_ids(tk, msgs, False)
            enc = tk(text, add_special_tokens=False, return_offsets_mapping=True)
            assert enc["input_ids"] == ids, cname
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            spans = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = render(tk, msgs[:i], True)
                upto = render(tk, msgs[: i + 1], False)
                assert upto.startswith(before) and text.startswith(upto), (name, cname, i)
                spans.append([len(before), len(upto)])
            mask = [
                int(e > s and any(a <= s and e <= b for a, b in spans)) for s, e in offsets
            ]
            # Every span starts and ends on a token boundary here, so the mask covers exactly
            # the spans' characters, whichever boundary rule a reader uses.
            covered = {c for (s, e), m in zip(offsets, mask) if m for c in range(s, e)}
            assert covered == {c for a, b in spans for c in range(a, b)}, (name, cname)
            bo = byte_offsets(text)
            prompt_text = render(tk, msgs[:-1], True)
            assert ids[: len(token_ids(tk, msgs[:-1], True))] == token_ids(tk, msgs[:-1], True)
            convs.append({
                "name": cname,
                "messages": msgs,
                "text": text,
                "ids": ids,
                "prompt_text": prompt_text,
                "prompt_ids": token_ids(tk, msgs[:-1], True),
                "assistant_spans": spans,
                "assistant_spans_bytes": [[bo[a], bo[b]] for a, b in spans],
                "assistant_texts": [text[a:b] for a, b in spans],
                "mask": mask,
            })
        write_json(os.path.join(d, name + ".json"), {
            "model_dir": name,
            "bos_token": tk.bos_token,
            "eos_token": tk.eos_token,
            "conversations": convs,
        })


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        # Keep the hand-written README; everything else is regenerated.
        for entry in os.listdir(OUT):
            if entry != "README.md":
                p = os.path.join(OUT, entry)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(OUT, exist_ok=True)
    texts = corpus_texts()
    tok = train_tokenizer(texts)
    tokenizer_fixtures(tok, texts)
    models_fixtures(tok)
    peft_fixtures()
    chat_fixtures()
    total = 0
    for dirpath, _, files in sorted(os.walk(OUT)):
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            total += os.path.getsize(p)
    print("wrote %s: %d bytes" % (os.path.relpath(OUT, ROOT), total), file=sys.stderr)


if __name__ == "__main__":
    main()
