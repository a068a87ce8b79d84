"""Generation scores comparable with ChatGLM-6B P-tuning, PromptCBLUE and LLaMA-Factory.

Per record (all values x100, averaged over records that have a reference):
- ROUGE-1/2/L: F of rouge_chinese on jieba-segmented text, exactly as those projects compute it.
  Note rouge_chinese's own conventions: ROUGE-N counts *distinct* n-grams, ROUGE-L is the LCS
  over the whole token sequence, and F carries a 1e-8 epsilon (identical texts give 99.999999..).
- BLEU-4: nltk sentence_bleu over characters with smoothing method3. Texts shorter than
  4 characters never reach 100, even when identical (missing n-gram orders are smoothed, not skipped).
- Exact match: pred.strip() == label.strip().
Blank rule: if pred or label segments to nothing (empty or whitespace-only), ROUGE and BLEU are 0
(rouge_chinese would raise; nltk would give whitespace-only text credit for matching spaces).
Exact match still applies, so two blank texts match.

Triples: a line is a triple when it splits on "_" into at least 3 parts, none blank after strip
("head_relation_tail"; extra "_" are allowed inside names). Per record the sets of triples of pred
and label are compared (other lines are ignored, so prose around triples is neither TP nor FP);
TP/FP/FN are summed over records (micro). Triple scores are reported only when every scored
reference's non-blank lines are all triples and at least one reference has a triple.
"""

import logging

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

jieba.setLogLevel(logging.WARNING)  # jieba logs "Building prefix dict ..." to stderr on first use

RECORD_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match")
_ROUGE = Rouge()
_SMOOTH = SmoothingFunction().method3


def score_record(pred: str, label: str) -> dict[str, float]:
    """ROUGE-1/2/L F, character BLEU-4 and exact match of one prediction against its reference, x100."""
    scores = dict.fromkeys(RECORD_KEYS, 0.0)
    scores["exact_match"] = 100.0 if pred.strip() == label.strip() else 0.0
    hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
    if not hyp.split() or not ref.split():  # blank on either side: nothing to compare
        return scores
    rouge = _ROUGE.get_scores(hyp, ref)[0]
    for key in ("rouge-1", "rouge-2", "rouge-l"):
        scores[key] = rouge[key]["f"] * 100
    scores["bleu-4"] = sentence_bleu([list(label)], list(pred), smoothing_function=_SMOOTH) * 100
    return scores


def _triple(line: str) -> tuple[str, ...] | None:
    parts = tuple(part.strip() for part in line.split("_"))
    return parts if len(parts) >= 3 and all(parts) else None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _triples(text: str) -> set[tuple[str, ...]]:
    return {t for t in map(_triple, _lines(text)) if t is not None}


def _looks_like_triples(labels: list[str]) -> bool:
    lines = [line for label in labels for line in _lines(label)]
    return bool(lines) and all(_triple(line) is not None for line in lines)


def _ratio(num: int, den: int) -> float:
    return num / den * 100 if den else 0.0


def triple_scores(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Micro precision/recall/F1 (x100) of the sets of head_relation_tail triples per record."""
    tp = fp = fn = 0
    for pred, label in zip(preds, labels, strict=True):
        got, want = _triples(pred), _triples(label)
        tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"triple_precision": p, "triple_recall": r, "triple_f1": f1}


def score_predictions(preds: list[str], labels: list[str | None]) -> dict:
    """Mean scores over records with a reference; "scored" and "total" say how many there were.

    Records whose label is None are skipped. With nothing scored only the counts are returned.
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels")
    pairs = [(pred, label) for pred, label in zip(preds, labels) if label is not None]
    result: dict = {"scored": len(pairs), "total": len(labels)}
    if not pairs:
        return result
    records = [score_record(pred, label) for pred, label in pairs]
    for key in RECORD_KEYS:
        result[key] = sum(r[key] for r in records) / len(records)
    scored_preds, scored_labels = [pred for pred, _ in pairs], [label for _, label in pairs]
    if _looks_like_triples(scored_labels):
        result.update(triple_scores(scored_preds, scored_labels))
    return result


_COLUMNS = [("ROUGE-1", "rouge-1"), ("ROUGE-2", "rouge-2"), ("ROUGE-L", "rouge-l"),
            ("BLEU-4", "bleu-4"), ("EM", "exact_match")]


def format_score_table(rows: dict[str, dict]) -> str:
    """Plain-text table, one row per named result (e.g. before/after), 2 decimals; "-" if absent."""
    columns = list(_COLUMNS)
    if any("triple_f1" in scores for scores in rows.values()):
        columns.append(("Triple-F1", "triple_f1"))
    header = [""] + [title for title, _ in columns] + ["Scored"]
    table = [header]
    for name, scores in rows.items():
        cells = [f"{scores[key]:.2f}" if key in scores else "-" for _, key in columns]
        counted = f"{scores['scored']}/{scores['total']}" if "scored" in scores else "-"
        table.append([name, *cells, counted])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [row[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(row[1:], widths[1:]))
             for row in table]
    return "\n".join(line.rstrip() for line in lines)
