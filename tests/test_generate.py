"""Generation: the KV cache and left-padded batching are optimisations, so they must not
change a single token; stop ids end rows; the CLI runs on kiln checkpoints and HF exports."""

import json

import hf_helpers
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_pipeline.tokenizer import Tokenizer
from model.hf_interop import hf_to_kiln_state_dict, model_config_from_hf
from model.llama import ModelConfig, Transformer, generate
from train.checkpoint.full_state import load_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20], [30, 31, 32], [40, 41, 42, 43, 44]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A random GQA model with a large init so logits depend strongly on the context
    (a 0.02 init makes it emit the same token over and over, which proves little)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                                   max_seq_len=64, init_std=0.3)).eval()


def _one_by_one(model, prompts, n, **kw):
    return [generate(model, torch.tensor([p]), n, **kw)[0].tolist() for p in prompts]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_lengths_equals_one_by_one_greedy(model, use_cache):
    batch = generate(model, PROMPTS, 16, temperature=0, use_cache=use_cache).tolist()
    single = _one_by_one(model, PROMPTS, 16, temperature=0)
    assert batch == single
    assert len({tuple(r) for r in single}) == len(PROMPTS) and all(len(set(r)) > 3 for r in single)


def test_kv_cache_equals_recompute_greedy_and_sampled(model):
    for kw in ({"temperature": 0}, {"temperature": 0.9, "top_k": 50, "top_p": 0.9}, {"temperature": 1.3}):
        runs = []
        for use_cache in (True, False):
            g = torch.Generator().manual_seed(7) if kw["temperature"] else None
            runs.append(generate(model, PROMPTS, 20, use_cache=use_cache, generator=g, **kw).tolist())
        assert runs[0] == runs[1], kw
    greedy = generate(model, PROMPTS, 20, temperature=0).tolist()
    sampled = generate(model, PROMPTS, 20, temperature=1.3, generator=torch.Generator().manual_seed(7)).tolist()
    assert sampled != greedy  # sampling is live, so the equality above is not greedy in disguise


def test_stop_ids_end_rows_and_pad_them(model):
    free = generate(model, PROMPTS, 16, temperature=0).tolist()
    row = free[0]
    i = next(i for i in range(2, 16) if row[i] not in row[:i])  # first fresh token after a few steps
    stop = row[i]
    out = generate(model, PROMPTS, 16, temperature=0, eos_id=[250, stop]).tolist()
    assert out[0][:i + 1] == row[:i + 1] and all(t == 250 for t in out[0][i + 1:])  # padded with eos_id[0]
    for r, f in zip(out[1:], free[1:]):  # other rows run on until they stop or the budget ends
        cut = next((j for j, t in enumerate(f) if t == stop), None)
        assert r[:len(f) if cut is None else cut + 1] == (f if cut is None else f[:cut + 1])


def test_tensor_and_list_prompts_agree(model):
    """The trainer passes a (B, T) tensor; equal-length lists take the same path."""
    p = [[1, 2, 3], [4, 5, 6]]
    assert generate(model, torch.tensor(p), 8, temperature=0).tolist() == generate(model, p, 8, temperature=0).tolist()


def test_generation_with_compiled_blocks_compiles_nothing_and_matches_eager(model):
    """Each decoding step has new shapes; compiled blocks would recompile for every few
    tokens of a sample. Generation runs them eagerly, with the same tokens."""
    import copy

    from torch._dynamo.utils import counters

    from train.compile import compile_blocks

    compiled = copy.deepcopy(model)
    compile_blocks(compiled)
    counters.clear()
    got = generate(compiled, PROMPTS, 12, temperature=0.0)
    assert counters["stats"]["unique_graphs"] == 0 and counters["stats"]["calls_captured"] == 0
    assert torch.equal(got, generate(model, PROMPTS, 12, temperature=0.0))


def test_the_kv_cache_is_made_in_the_compute_dtype(model):
    """Under mixed precision the keys are bf16 while the weights are fp32 (and, with
    offloaded parameters, on another device): the cache follows the keys."""
    caches = model.new_kv_caches(1, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor([[5, 6, 7]]), kv_caches=caches)
        model(torch.tensor([[8]]), position_ids=torch.tensor([[3]]), kv_caches=caches)
    assert all(c.k.dtype == torch.bfloat16 and c.v.dtype == torch.bfloat16 and c.pos == 4 for c in caches)
    assert model.tok_embeddings.weight.dtype == torch.float32


def test_greedy_matches_transformers_generate():
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=256, max_position_embeddings=64, initializer_range=0.3)
    hf = LlamaForCausalLM(cfg).eval()
    kcfg = model_config_from_hf(cfg.to_dict())
    ours = Transformer(kcfg)
    ours.load_state_dict(hf_to_kiln_state_dict(hf.state_dict(), kcfg))
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    assert generate(ours, prompt, 12, temperature=0)[0].tolist() == theirs.tolist()


def test_generate_cli_on_checkpoint_and_hf_export(tmp_path, tmp_path_factory):
    run_dir = hf_helpers.tiny_run(tmp_path_factory)
    export = hf_helpers.tiny_export(tmp_path_factory)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("The Python interpreter\n\nDebian 12 <|user|> hello\n")
    prompts = ["Once upon", "The Python interpreter", "Debian 12 <|user|> hello"]
    args = ["--prompt", "Once upon", str(prompts_file), "--max-new-tokens", "12", "--temperature", "0",
            "--batch-size", "2", "--format", "jsonl"]
    outputs = []
    for target in (run_dir, export):
        p = hf_helpers.launch("generate.py", target, *args, "--out", str(tmp_path / "out.jsonl"))
        rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        assert [r["prompt"] for r in rows] == prompts
        assert [json.loads(line) for line in open(tmp_path / "out.jsonl")] == rows
        outputs.append(rows)
    assert outputs[0] == outputs[1]  # the export generates exactly what the checkpoint does
    model, step_dir = load_model(run_dir)
    tok = Tokenizer(f"{step_dir}/tokenizer.model")
    for r in outputs[0]:
        want = generate(model, torch.tensor([tok.encode(r["prompt"])]), 12, temperature=0,
                        eos_id=[tok.eos_id, tok.control["<|end_of_turn|>"]])[0].tolist()
        stop = next((i for i, t in enumerate(want) if t in (tok.eos_id, tok.control["<|end_of_turn|>"])), None)
        assert r["tokens"] == want[:stop] and r["completion"] == tok.decode(r["tokens"])
        assert r["stopped"] == (stop is not None)


def test_generate_cli_rejects_bad_arguments_with_exit_2_naming_them(tmp_path):
    """Options are argparse flags: a bad value, a typo'd flag or an old key=value word stops
    with status 2 and argparse's message naming it, before any model is loaded."""
    for argv, named in ((["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
                        (["--format", "csv"], "argument --format: invalid choice: 'csv'"),
                        (["--temp", "0"], "unrecognized arguments: --temp"),
                        (["max_new_tokens=4"], "prompts file 'max_new_tokens=4' not found (options are --flags")):
        p = hf_helpers.launch("generate.py", str(tmp_path / "no_model"), "--prompt", "x", *argv, check=False)
        assert p.returncode == 2 and named in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
