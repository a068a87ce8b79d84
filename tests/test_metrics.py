"""fora/metrics.py against values computed by hand, independently of rouge_chinese and nltk."""

import math

import jieba
import pytest

from fora.metrics import format_score_table, score_predictions, score_record

# rouge_chinese adds 1e-8 to the F denominator, so identical texts give 99.999999..., not 100.
approx = lambda x: pytest.approx(x, abs=1e-4)  # noqa: E731


def f1(p, r):
    return 2 * p * r / (p + r)


def test_rouge_by_hand_from_jieba_tokens():
    pred, label = "发热症状，患者出现咳嗽和发热", "患者出现发热症状"
    pred_tokens = ["发热", "症状", "，", "患者", "出现", "咳嗽", "和", "发热"]
    label_tokens = ["患者", "出现", "发热", "症状"]
    assert list(jieba.cut(pred)) == pred_tokens and list(jieba.cut(label)) == label_tokens

    # ROUGE-N in rouge_chinese counts distinct n-grams: the pred has 7 distinct unigrams ("发热" twice).
    # overlap {患者, 出现, 发热, 症状} = 4 -> P = 4/7, R = 4/4
    rouge1 = f1(4 / 7, 4 / 4) * 100  # = 8/11 = 72.73
    # pred bigrams: 发热症状 症状， ，患者 患者出现 出现咳嗽 咳嗽和 和发热 (7)
    # label bigrams: 患者出现 出现发热 发热症状 (3); overlap {发热症状, 患者出现} = 2
    rouge2 = f1(2 / 7, 2 / 3) * 100  # = 40
    # LCS(label, pred) = 患者 出现 发热 = 3; lengths are full token counts: P = 3/8, R = 3/4
    rougel = f1(3 / 8, 3 / 4) * 100  # = 50
    assert (round(rouge1, 2), round(rouge2, 2), round(rougel, 2)) == (72.73, 40.0, 50.0)

    scores = score_record(pred, label)
    assert scores["rouge-1"] == approx(rouge1)
    assert scores["rouge-2"] == approx(rouge2)
    assert scores["rouge-l"] == approx(rougel)
    assert scores["exact_match"] == 0.0


def test_bleu_identical_is_100():
    scores = score_record("患者出现发热症状", "患者出现发热症状")
    assert scores["bleu-4"] == approx(100.0)
    assert scores["rouge-1"] == approx(100.0) and scores["rouge-l"] == approx(100.0)
    assert scores["exact_match"] == 100.0


def test_bleu_by_hand_with_method3_smoothing():
    # chars: pred 发 热 咳 嗽 (4), reference 发 热 头 痛 咳 嗽 (6)
    # modified precisions: p1 = 4/4; p2 = {发热, 咳嗽} of {发热, 热咳, 咳嗽} = 2/3;
    # p3 = 0/2 and p4 = 0/1 -> method3 replaces the k-th zero count by 1/2^k: p3 = (1/2)/2, p4 = (1/4)/1
    p = [1.0, 2 / 3, (1 / 2) / 2, (1 / 4) / 1]
    bp = math.exp(1 - 6 / 4)  # hypothesis shorter than the reference
    bleu = bp * math.exp(sum(0.25 * math.log(x) for x in p)) * 100
    assert round(bleu, 2) == 27.40
    assert score_record("发热咳嗽", "发热头痛咳嗽")["bleu-4"] == approx(bleu)


def test_bleu_identical_but_shorter_than_four_chars_is_not_100():
    # "ab" vs "ab": p1 = p2 = 1, no 3-/4-grams at all -> smoothed to 1/2 and 1/4
    expected = (1 * 1 * 0.5 * 0.25) ** 0.25 * 100  # 59.46
    assert score_record("ab", "ab")["bleu-4"] == approx(expected)


@pytest.mark.parametrize("pred,label", [
    ("", "患者出现发热症状"),
    ("患者出现发热症状", ""),
    ("  \n\t", "患者出现发热症状"),
    ("患者出现发热症状", " \u3000 "),
    ("  ", "a b"),  # nltk alone would give the blank prediction credit for the space
])
def test_blank_side_scores_zero(pred, label):
    assert score_record(pred, label) == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0, "exact_match": 0.0}


def test_both_blank_is_an_exact_match_only():
    assert score_record(" ", "") == {
        "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0, "exact_match": 100.0}


def test_exact_match_ignores_surrounding_whitespace_only():
    assert score_record("  水温高\n", "水温高")["exact_match"] == 100.0
    assert score_record("水温 高", "水温高")["exact_match"] == 0.0
    result = score_predictions(["a", "b", "c", "d"], ["a", "x", "c", "y"])
    assert result["exact_match"] == 50.0


def test_triple_micro_precision_recall_f1():
    labels = [
        "发动机_部件故障_水温高\n风扇_部件故障_低速转动",
        "刹车_部件故障_异响\n轮胎_部件故障_漏气",
        "车灯_部件故障_不亮",
    ]
    preds = [
        # TP 2 (order and surrounding spaces do not matter; the prose line is not a triple)
        "以下是三元组：\n 风扇_部件故障_低速转动 \n发动机_部件故障_水温高",
        # TP 1, FP 1 (wrong tail), FN 1 (轮胎)
        "刹车_部件故障_异响\n刹车_部件故障_漏气",
        # FN 1; malformed lines "车灯__不亮" and "车灯_不亮" are not triples
        "车灯__不亮\n车灯_不亮",
    ]
    # TP = 3, FP = 1, FN = 2 -> P = 3/4, R = 3/5, F1 = 2PR/(P+R)
    result = score_predictions(preds, labels)
    assert result["triple_precision"] == approx(75.0)
    assert result["triple_recall"] == approx(60.0)
    assert result["triple_f1"] == approx(f1(0.75, 0.6) * 100)
    assert round(result["triple_f1"], 2) == 66.67


def test_triple_scores_only_when_references_are_triples():
    assert "triple_f1" not in score_predictions(["a_b_c"], ["发动机_部件故障_水温高\n水温高"])
    assert "triple_f1" not in score_predictions(["a"], [""])
    # a reference without triples (empty) is fine when the others have them; its pred triples are FP
    result = score_predictions(["a_b_c", "x_y_z"], ["a_b_c", ""])
    assert (result["triple_precision"], result["triple_recall"]) == (50.0, 100.0)


def test_labels_none_are_skipped_and_counted():
    result = score_predictions(["患者出现发热症状", "随便什么", "abc"], ["患者出现发热症状", None, "abd"])
    assert (result["scored"], result["total"]) == (2, 3)
    assert result["exact_match"] == 50.0
    # mean over the two scored records; "abc" vs "abd": unigram p1 = 2/3, p2 = 1/2, p3 = (1/2)/1,
    # p4 = (1/4)/1, equal lengths so no brevity penalty
    abc = (2 / 3 * 1 / 2 * 1 / 2 * 1 / 4) ** 0.25 * 100
    assert result["bleu-4"] == approx((100.0 + abc) / 2)


def test_all_none_scores_nothing():
    assert score_predictions(["a", "b"], [None, None]) == {"scored": 0, "total": 2}
    assert score_predictions([], []) == {"scored": 0, "total": 0}


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score_predictions(["a"], ["a", "b"])


def test_format_score_table():
    before = score_predictions(["发热咳嗽", "x"], ["发热头痛咳嗽", None])
    after = score_predictions(["发热头痛咳嗽", "x"], ["发热头痛咳嗽", None])
    table = format_score_table({"before": before, "after": after})
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["ROUGE-1", "ROUGE-2", "ROUGE-L", "BLEU-4", "EM", "Scored"]
    assert lines[1].split()[0] == "before" and "27.40" in lines[1] and lines[1].endswith("1/2")
    assert lines[2].split() == ["after", "100.00", "100.00", "100.00", "100.00", "100.00", "1/2"]


def test_format_score_table_with_triples_and_nothing_scored():
    scored = score_predictions(["a_b_c"], ["a_b_c\nd_e_f"])
    table = format_score_table({"tuned": scored, "empty": {"scored": 0, "total": 1}})
    lines = table.splitlines()
    assert lines[0].split()[-2:] == ["Triple-F1", "Scored"]
    assert lines[1].split()[-2:] == [f"{f1(1.0, 0.5) * 100:.2f}", "1/1"]  # 66.67
    assert lines[2].split() == ["empty", "-", "-", "-", "-", "-", "-", "0/1"]
