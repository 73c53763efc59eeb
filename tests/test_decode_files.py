"""decode.py --prompts-file: continuous batching streamed to --output, resumed on a rerun."""

import json

import pytest

from ag_jax import batch_decode


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  root = tmp_path_factory.mktemp("files")
  preset = root / "micro.yaml"
  preset.write_text("vocab_size: 259\ndim: 32\nnum_layers: 2\nnum_heads: 2\nnum_kv_heads: 1\n"
                    "head_dim: 16\nmlp_dim: 64\nmax_position: 128\n")
  prompts = root / "prompts.jsonl"
  rows = [{"prompt": "hello"}, {"prompt": "the quick brown fox", "max_new_tokens": 2},
          {"prompt": "a third prompt, longer than the others", "id": "third"},
          {"prompt": "four", "answer": "x"}, {"prompt": "and five, the last one"}]
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(preset), str(prompts), root


def args(micro, out, *extra):
  preset, prompts, _ = micro
  return ["--model", preset, "--prompts-file", prompts, "--output", str(out), "--slots", "2",
          "--max-new-tokens", "5", "--policy", "h2o", "--capacity", "8", "--quiet", *extra]


def lines(path):
  return [json.loads(x) for x in open(path, encoding="utf-8")]


def _error(capsys, code):
  assert code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return err


def test_streams_every_prompt_and_resumes_after_an_interruption(micro, capsys):
  _, _, root = micro
  out = root / "out.jsonl"
  assert batch_decode.main(args(micro, out)) == 0
  first = lines(out)
  assert sorted(map(str, (r["id"] for r in first))) == ["1", "2", "4", "5", "third"]
  by_id = {r["id"]: r for r in first}
  assert len(by_id[2]["tokens"]) == 2 and len(by_id[1]["tokens"]) == 5  # per-line limits
  assert by_id[4]["answer"] == "x" and "correct" in by_id[4]
  assert all(r["stop"] == "length" and 0 < r["kept"] <= 1 for r in first)
  assert all(r["run"]["capacity"] == 8 for r in first)
  summary = capsys.readouterr().out
  assert "5 decoded now" in summary and "continuous batching: 2 slots" in summary

  # Interrupted after two lines and part of a third: the rerun redoes the third and the rest.
  text = out.read_text(encoding="utf-8").splitlines(keepends=True)
  out.write_text("".join(text[:2]) + text[2][:17], encoding="utf-8")
  assert batch_decode.main(args(micro, out)) == 0
  again = lines(out)
  assert len(again) == 5 and again[:2] == first[:2]
  assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, first))  # same results
  assert "3 decoded now (2 already in" in capsys.readouterr().out

  # All done: a rerun decodes nothing and leaves the file as it is.
  before = out.read_bytes()
  assert batch_decode.main(args(micro, out)) == 0
  assert out.read_bytes() == before and "0 decoded now" in capsys.readouterr().out


def test_output_of_another_run_is_refused(micro, capsys):
  _, _, root = micro
  out = root / "other.jsonl"
  assert batch_decode.main(args(micro, out)) == 0
  capsys.readouterr()
  before = out.read_bytes()
  message = _error(capsys, batch_decode.main(args(micro, out, "--capacity", "9")))
  assert "holds results of another run" in message and "capacity" in message
  assert out.read_bytes() == before
  foreign = root / "foreign.jsonl"
  foreign.write_text('{"a": 1}\n')
  assert "not a result line" in _error(capsys, batch_decode.main(args(micro, foreign)))


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "prompt id 1 appears twice"),
    ('{"prompt": "a", "max_new_tokens": 0}\n', "max_new_tokens must be a positive integer"),
    ('{"prompt": "a", "id": [1]}\n', "id must be a string or an integer"),
    ('{"prompt": "a", "answer": [1, 2]}\n', "answer must be a string or a non-empty list"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_files_are_refused_before_anything_is_written(micro, capsys, tmp_path,
                                                                 content, message):
  preset = micro[0]
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(content)
  out = tmp_path / "out.jsonl"
  code = batch_decode.main(["--model", preset, "--prompts-file", str(prompts), "--output",
                            str(out), "--max-new-tokens", "3"])
  assert message in _error(capsys, code)
  assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--output", "x.json"], "ending in .jsonl"),
    (["--slots", "2", "--memory-gb", "1"], "not both"),
    (["--slots", "0"], "--slots must be a positive integer"),
    (["--memory-gb", "1e-9"], "fits no slot"),
])
def test_bad_flags(micro, capsys, extra, message):
  preset, prompts, _ = micro
  code = batch_decode.main(["--model", preset, "--prompts-file", prompts, *extra])
  assert message in _error(capsys, code)


def test_flags_that_need_a_prompts_file(micro, capsys):
  preset = micro[0]
  for extra, message in ((["--output", "o.jsonl"], "give --prompts-file"),
                         (["--slots", "2"], "with --prompt use --batch-size")):
    code = batch_decode.main(["--model", preset, "--prompt", "x", *extra])
    assert message in _error(capsys, code)
  code = batch_decode.main(["--model", preset, "--prompt", "x", "--prompts-file", micro[1]])
  assert "not both" in _error(capsys, code)


def test_answers_score_by_prefix_or_by_all_items():
  score = batch_decode.score_generation
  assert score(" 40\n", " 40") and not score(" 41", " 40")        # one string: a prefix
  assert score(" 85, 48, 25", [" 48", " 85", " 25"])               # items: all, any order
  assert not score(" 85, 48", [" 48", " 85", " 25"])
  assert not score(" 85, 48\n# 25", [" 48", " 85", " 25"])         # on the answer line
