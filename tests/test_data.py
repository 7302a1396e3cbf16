"""nanokimi.data: tokenizer, task generators, verifiers, splits, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanokimi.data import (
    SPLITS,
    TOKENIZER,
    AdditionTask,
    CharTokenizer,
    Example,
    collate,
    make_task,
    prompt_ids,
    split_of,
    task_from_spec,
)

ALL_TASKS = [
    make_task("add"),
    make_task("add", digits=2, reverse=True, scratchpad=(0, 1, 2)),
    make_task("add", label_noise=0.6),
    make_task("add", digits=(1, 2, 3), scratchpad=(0, 1), reverse=True),
    make_task("mqar", pairs=6, queries=3, gap=2),
    make_task("copy", length=5),
    make_task("reverse", length=5),
]


# --- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_specials():
    text = "0123+987=;,.|azAZ"
    ids = TOKENIZER.encode(text, bos=True, eos=True)
    assert ids[0] == TOKENIZER.bos_id and ids[-1] == TOKENIZER.eos_id
    assert len(ids) == len(text) + 2
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode(ids + TOKENIZER.encode("zz")) == text  # stops at <eos>
    assert TOKENIZER.decode(ids + TOKENIZER.encode("zz"), stop_at_eos=False) == text + "zz"
    assert TOKENIZER.decode(torch.tensor([TOKENIZER.pad_id, *TOKENIZER.encode("7")])) == "7"
    assert TOKENIZER.vocab_size == 3 + len(TOKENIZER.chars)
    assert len({TOKENIZER.pad_id, TOKENIZER.bos_id, TOKENIZER.eos_id}) == 3


def test_tokenizer_rejects_unknown_characters_and_ids():
    with pytest.raises(ValueError, match=r"character '\?' at position 1"):
        TOKENIZER.encode("1?2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOKENIZER.decode([TOKENIZER.vocab_size])
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer("aa")


# --- tasks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_examples_are_deterministic_and_verified(task):
    a = task.examples("train", 20, seed=3)
    b = task.examples("train", 20, seed=3)
    c = task.examples("train", 20, seed=4)
    assert [(e.prompt, e.response) for e in a] == [(e.prompt, e.response) for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    for ex in a:
        TOKENIZER.encode(ex.prompt + ex.response)  # every character is in the vocabulary
        assert len(ex.response) <= task.max_response_len()
        if not ex.meta.get("corrupted", False):
            assert task.check(ex.prompt, ex.response), (ex.prompt, ex.response)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_splits_never_share_a_problem(task):
    ids = {split: {task.problem_id(e) for e in task.examples(split, 60, seed=0)} for split in SPLITS}
    assert all(len(v) == 60 for v in ids.values())  # distinct within a split
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    for split, pids in ids.items():  # and each split is what the hash says, whatever the seed
        assert all(split_of(p) == split for p in pids)


def test_split_fractions_follow_the_hash_bands():
    rng = np.random.default_rng(0)
    counts = dict.fromkeys(SPLITS, 0)
    for _ in range(4000):
        counts[split_of(str(rng.integers(1 << 40)))] += 1
    assert 0.77 < counts["train"] / 4000 < 0.83
    assert 0.08 < counts["val"] / 4000 < 0.12


def test_small_problem_space_runs_out_with_a_clear_error():
    task = make_task("add", digits=1)  # 100 problems, about 10 in the test split
    with pytest.raises(ValueError, match=r"found only \d+"):
        task.examples("test", 50, seed=0)
    assert len(task.examples("test", 50, seed=0, distinct=False)) == 50


def test_addition_formats():
    plain = AdditionTask(digits=3)
    assert plain.format_prompt(47, 385) == "047+385="
    assert plain.format_response(47, 385, 0) == "0432"
    assert AdditionTask(digits=3, reverse=True).format_response(47, 385, 0) == "2340"
    # columns from the least significant: 7+5+0=12, 4+8+1=13, 0+3+1=04
    assert plain.format_response(47, 385, 1) == "12,13,04;0432"
    assert plain.format_response(47, 385, 2) == "7+5+0=12,4+8+1=13,0+3+1=04;0432"
    assert plain.max_response_len() == 4
    assert AdditionTask(digits=3, scratchpad=(0, 2)).max_response_len() == len("7+5+0=12,4+8+1=13,0+3+1=04;0432")


def test_int_digits_stream_is_unchanged():
    # Pinned from the int-only AdditionTask: adding digit mixtures must not move a single example of an int task.
    task = make_task("add", digits=3, scratchpad=(0, 1, 2))
    assert [(e.prompt, e.response) for e in task.examples("train", 4, seed=0)] == [
        ("850+636=", "06,08,14;1486"),
        ("269+307=", "0576"),
        ("075+016=", "0091"),
        ("813+649=", "3+9+0=12,1+4+1=06,8+6+0=14;1462"),
    ]
    noisy = make_task("add", digits=2, label_noise=0.9)
    assert [(e.prompt, e.response) for e in noisy.examples("test", 4, seed=5)] == [
        ("59+54=", "110"),
        ("25+53=", "078"),
        ("50+73=", "123"),
        ("01+08=", "009"),
    ]
    one = make_task("add", digits=(3,), scratchpad=(0, 1, 2))  # a one-count tuple is the int task
    assert one.digits == 3 and one.spec() == task.spec()
    assert [(e.prompt, e.response) for e in one.examples("val", 50, seed=[2, 7])] == [
        (e.prompt, e.response) for e in task.examples("val", 50, seed=[2, 7])
    ]


def test_addition_digit_mixture():
    task = make_task("add", digits=(2, 3, 4), scratchpad=(0, 2))
    assert task.digits == task.digit_counts == (2, 3, 4)
    examples = task.examples("train", 300, seed=0)
    counts = [e.meta["digits"] for e in examples]
    assert set(counts) == {2, 3, 4} and min(counts.count(d) for d in (2, 3, 4)) > 60  # ~1/3 each
    for ex in examples:
        d = ex.meta["digits"]
        assert ex.prompt == task.format_prompt(ex.meta["a"], ex.meta["b"], d) and len(ex.prompt) == 2 * d + 2
        assert ex.response == task.format_response(ex.meta["a"], ex.meta["b"], ex.meta["scratchpad"], d)
        assert task.check(ex.prompt, ex.response)
    # the longest response is the 4-digit one at verbosity 2; ood: more digits than any count in the mixture
    assert task.max_response_len() == len("0+0+0=00,0+0+0=00,0+0+0=00,0+0+0=00;00000")
    assert task.spec()["digits"] == [2, 3, 4] and task.ood().digits == 6
    assert task_from_spec(task.spec()).spec() == task.spec()
    with pytest.raises(ValueError, match=r"prompt: expected 'dd\+dd=' or 'ddd\+ddd=' or 'dddd\+dddd='"):
        task.check("7+5=", "12")
    with pytest.raises(ValueError, match="prompt: expected"):
        task.check("07+005=", "12")  # operands of different lengths
    with pytest.raises(ValueError, match=r"digits: expected one of \[2, 3, 4\] for a mixture, got None"):
        task.format_prompt(1, 2)
    with pytest.raises(ValueError, match=r"digits: expected one of \[2, 3, 4\], got 5"):
        task.format_response(1, 2, 0, digits=5)
    # label noise reads the leading digit of the prompt's own digit count
    noisy = make_task("add", digits=(1, 3), label_noise=0.9)
    assert noisy.noise_rate("9+1=") == pytest.approx(0.9) and noisy.noise_rate("099+100=") == 0.0


def test_scratchpad_verbosity_varies_response_length():
    task = make_task("add", digits=3, scratchpad=(0, 1, 2))
    lengths = {len(e.response) for e in task.examples("train", 60, seed=0)}
    assert lengths == {4, 4 + 9, 4 + 27}
    assert not task.deterministic and make_task("add", scratchpad=2).deterministic


def test_addition_verifier_edge_cases():
    task = make_task("add", digits=3)
    assert task.check("047+385=", "0432")
    assert task.check("047+385=", "432")  # the value counts, not the zero padding
    assert task.check("047+385=", "7+5+0=99;0432")  # only the final answer is verified
    assert not task.check("047+385=", "0433")
    assert not task.check("047+385=", "")
    assert not task.check("047+385=", "04a2")
    assert not task.check("047+385=", "0432;")
    rev = make_task("add", digits=3, reverse=True)
    assert rev.check("047+385=", "2340") and not rev.check("047+385=", "0432")
    with pytest.raises(ValueError, match="prompt: expected 'ddd\\+ddd='"):
        task.check("47+385=", "432")


def test_label_noise_rate_is_known_and_input_dependent():
    task = make_task("add", digits=2, label_noise=0.9)
    assert task.noise_rate("05+33=") == 0.0
    assert task.noise_rate("95+33=") == pytest.approx(0.9)
    assert task.noise_rate("45+33=") == pytest.approx(0.4)
    examples = task.examples("train", 3000, seed=0, distinct=False)
    for ex in examples:
        assert ex.meta["noise_rate"] == task.noise_rate(ex.prompt)
        assert task.check(ex.prompt, ex.response) != ex.meta["corrupted"]  # a corruption always changes the sum
        clean = task.format_response(ex.meta["a"], ex.meta["b"], 0)
        assert ex.response[:-1] == clean[:-1]  # only the units digit is ever touched
    high = [e for e in examples if e.meta["noise_rate"] >= 0.7]
    low = [e for e in examples if e.meta["noise_rate"] == 0.0]
    assert not any(e.meta["corrupted"] for e in low)
    observed = np.mean([e.meta["corrupted"] for e in high])
    expected = np.mean([e.meta["noise_rate"] for e in high])
    assert abs(observed - expected) < 0.05


def test_mqar_layout_and_verifier():
    task = make_task("mqar", pairs=4, queries=2, gap=3)
    ex = task.examples("val", 1, seed=0)[0]
    pairs, _ = ex.prompt.split("|")
    assert len(pairs) == 2 * 4 + 3 and pairs.endswith("...")
    assert len(ex.response) == 4 and ex.scored == (False, True, False, True)
    assert task.check("aXbYcZdW|", "bYdW")
    assert not task.check("aXbYcZdW|", "bYdX")  # wrong value
    assert not task.check("aXbYcZdW|", "bYbY")  # repeated query
    assert not task.check("aXbYcZdW|", "bY")  # too few
    assert not task.check("aXbYcZdW|", "eYbY")  # unknown key
    with pytest.raises(ValueError, match="pairs: expected at most 26"):
        make_task("mqar", pairs=27)
    with pytest.raises(ValueError, match="queries: expected at most pairs=3"):
        make_task("mqar", pairs=3, queries=4)


def test_copy_reverse_verifier():
    assert make_task("copy").check("abc=", "abc") and not make_task("copy").check("abc=", "cba")
    assert make_task("reverse").check("abc=", "cba") and not make_task("reverse").check("abc=", "abcd")


def test_ood_variants_are_harder():
    assert make_task("add", digits=3).ood().digits == 5
    assert make_task("mqar", pairs=8).ood().pairs == 16
    assert make_task("mqar", pairs=20).ood().pairs == 26
    assert make_task("copy", length=8).ood().length == 16
    ood = make_task("add", digits=2, reverse=True, scratchpad=1).ood()
    assert (ood.digits, ood.reverse, ood.levels) == (4, True, (1,))
    ex = ood.examples("test", 1, seed=0)[0]
    assert len(ex.prompt) == 2 * 4 + 2 and ood.check(ex.prompt, ex.response)


@pytest.mark.parametrize("task", ALL_TASKS, ids=repr)
def test_spec_round_trip(task):
    again = task_from_spec(task.spec())
    assert again.spec() == task.spec()
    assert [e.response for e in again.examples("val", 5, seed=1)] == [
        e.response for e in task.examples("val", 5, seed=1)
    ]


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="task: expected one of"):
        make_task("sudoku")
    with pytest.raises(ValueError, match=r"unknown task knobs \[.pairs.\]"):
        make_task("add", pairs=3)
    with pytest.raises(ValueError, match="scratchpad"):
        make_task("add", scratchpad=3)
    with pytest.raises(ValueError, match="label_noise"):
        make_task("add", label_noise=1.5)
    with pytest.raises(TypeError, match="digits"):
        make_task("add", digits=2.5)
    with pytest.raises(TypeError, match="digits: expected a positive int, got float 2.5"):
        make_task("add", digits=(2, 2.5))
    with pytest.raises(ValueError, match="digits: expected a positive int, got 0"):
        make_task("add", digits=(0, 3))
    with pytest.raises(ValueError, match=r"digits: expected a positive int or a non-empty tuple of them, got \(\)"):
        make_task("add", digits=())
    with pytest.raises(ValueError, match="digits: expected distinct digit counts"):
        make_task("add", digits=(3, 3))
    with pytest.raises(ValueError, match="split: expected one of"):
        make_task("add").examples("dev", 3, seed=0)
    with pytest.raises(ValueError, match="spec: expected a 'name'"):
        task_from_spec({"digits": 3})


# --- collation ---------------------------------------------------------------------------------------------
def test_collate_scores_only_the_response_and_eos():
    examples = [Example("12+34=", "046"), Example("ab|", "aXbY", (False, True, False, True))]
    batch = collate(examples)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (2, 10)
    row = TOKENIZER.encode("12+34=046", bos=True, eos=True)
    assert batch.inputs[0].tolist() == row[:-1] and batch.targets[0].tolist() == row[1:]
    # targets 6..9 are "0", "4", "6", <eos>
    assert batch.loss_mask[0].tolist() == [False] * 6 + [True] * 4
    assert TOKENIZER.decode(batch.targets[1][batch.loss_mask[1]], stop_at_eos=False) == "XY"
    assert batch.targets[1][batch.loss_mask[1]].tolist()[-1] == TOKENIZER.eos_id
    assert not batch.loss_mask[1, 8:].any()  # padding is never scored
    assert prompt_ids(examples)[1] == TOKENIZER.encode("ab|", bos=True)
    with pytest.raises(ValueError, match="at least one example"):
        collate([])
