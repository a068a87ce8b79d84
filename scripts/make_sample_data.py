"""Generate FoRA's own synthetic sample data: Chinese fault-report triple extraction.

Each record is a short made-up fault report (alpaca format: instruction/input/output)
built from small hand-written vocabularies and sentence templates. The output lists
triples "head_relation_tail" joined by "\\n", in the order they appear in the text,
with relations 性能故障 / 部件故障 / 组成 / 检测工具. Every head and tail is copied
verbatim from the input, so a small model can learn the task in a short fine-tune.

    python scripts/make_sample_data.py [--out_dir data] [--seed 42]

Same seed -> byte-identical files. Nothing here is copied from any external dataset.
"""
import argparse
import json
import random
from pathlib import Path

# Short on purpose: SmolLM2's tokenizer spends ~1.8 tokens per Chinese character, and every
# prompt token costs training time in the demo.
INSTRUCTION = "抽取故障三元组（头_关系_尾，每行一个）："

# whole (subsystem) -> parts; gives 组成 triples as part_组成_whole
SYSTEMS = {
    "发动机": ["活塞", "进气门", "曲轴", "火花塞", "喷油嘴", "节气门"],
    "变速箱": ["离合器", "同步器", "换挡拨叉", "齿轮"],
    "制动系统": ["刹车片", "制动盘", "制动分泵"],
    "冷却系统": ["水泵", "散热器", "节温器", "风扇"],
    "液压系统": ["液压泵", "溢流阀", "油缸", "密封圈"],
    "转向系统": ["转向泵", "方向机", "转向拉杆"],
    "电气系统": ["蓄电池", "发电机", "起动机", "继电器"],
}
SYMPTOMS = {  # plausible fault symptoms for a subsystem and all of its parts
    "发动机": ["积碳", "磨损", "卡死", "烧蚀", "抖动", "异响", "漏油"],
    "变速箱": ["磨损", "打滑", "异响", "卡滞", "断裂", "漏油"],
    "制动系统": ["磨损", "过热", "卡滞", "变形", "异响", "漏油"],
    "冷却系统": ["漏水", "堵塞", "卡死", "异响", "损坏", "失效"],
    "液压系统": ["漏油", "卡滞", "磨损", "老化", "异响", "堵塞"],
    "转向系统": ["松动", "漏油", "异响", "卡滞", "磨损"],
    "电气系统": ["老化", "烧蚀", "接触不良", "短路", "失效"],
}
SYSTEM_OF = {c: w for w, parts in SYSTEMS.items() for c in [w, *parts]}  # component -> subsystem
COMPONENTS = list(SYSTEM_OF)
METRICS = ["水温", "油温", "油压", "怠速", "转速", "电压", "输出功率", "制动力", "充电电流", "排气温度", "系统压力"]
STATES = ["过高", "过低", "偏高", "偏低", "不稳定", "波动大", "不足"]
TOOLS = {  # tool -> things it is used to check; gives tool_检测工具_target
    "万用表": ["蓄电池", "继电器", "发电机", "电压", "充电电流"],
    "压力表": ["油压", "系统压力", "液压泵", "溢流阀"],
    "红外测温仪": ["水温", "油温", "散热器", "制动盘", "排气温度"],
    "故障诊断仪": ["发动机", "节气门", "喷油嘴", "怠速", "转速"],
    "内窥镜": ["活塞", "进气门", "油缸"],
    "听诊器": ["曲轴", "齿轮", "水泵", "方向机"],
    "塞尺": ["进气门", "刹车片", "同步器"],
}
VEHICLES = ["轿车", "重型卡车", "越野车", "城市客车", "面包车"]
MACHINES = ["挖掘机", "装载机", "叉车", "拖拉机", "起重机", "压路机"]

PART_FAULT = ["检查发现{c}{s}。", "{c}出现{s}现象。", "经排查，{c}存在{s}问题。", "运行一段时间后{c}{s}。"]
PERF_FAULT = ["仪表显示{m}{v}。", "运行时{m}明显{v}。", "测得{m}{v}。", "司机反映{m}{v}。"]
TOOL_USE = ["使用{t}检测{x}。", "维修人员用{t}对{x}进行检查。", "随后借助{t}测量{x}。"]
HEADERS = ["故障报告{n}：", "故障现象：", "一辆{v}，行驶里程{n}公里。", "一台{k}，已运行{h}小时。", ""]
DISTRACTORS = ["用户反映{d}天前刚做过保养。", "其余各项检查均正常。", "故障发生时为夜间作业。",
               "已通知售后人员到场处理。", "此前无维修记录。", "更换相关部件后故障排除。"]


def fresh(rng, pool, used):
    """Pick an item not yet mentioned in this record (keeps triples unambiguous)."""
    item = rng.choice([x for x in pool if x not in used])
    used.add(item)
    return item


def fact(rng, kind, used):
    """Return (sentence, triples) for one fact of the given kind."""
    if kind == "part":
        c = fresh(rng, COMPONENTS, used)
        s = rng.choice(SYMPTOMS[SYSTEM_OF[c]])
        return rng.choice(PART_FAULT).format(c=c, s=s), [f"{c}_部件故障_{s}"]
    if kind == "perf":
        m, v = fresh(rng, METRICS, used), rng.choice(STATES)
        return rng.choice(PERF_FAULT).format(m=m, v=v), [f"{m}_性能故障_{v}"]
    if kind == "tool":
        t = fresh(rng, TOOLS, used)
        x = fresh(rng, TOOLS[t], used)
        return rng.choice(TOOL_USE).format(t=t, x=x), [f"{t}_检测工具_{x}"]
    w = fresh(rng, SYSTEMS, used)
    if kind == "has2":  # two composition triples from one sentence
        p1, p2 = fresh(rng, SYSTEMS[w], used), fresh(rng, SYSTEMS[w], used)
        return f"{w}主要由{p1}和{p2}等部件组成。", [f"{p1}_组成_{w}", f"{p2}_组成_{w}"]
    p, s = fresh(rng, SYSTEMS[w], used), rng.choice(SYMPTOMS[w])  # kind == "has_fault"
    sent = rng.choice(["拆检{w}的{p}，发现其{s}。", "{w}内部的{p}{s}。"]).format(w=w, p=p, s=s)
    return sent, [f"{p}_组成_{w}", f"{p}_部件故障_{s}"]


def make_record(rng):
    """One report with 1-3 triples, 40-120 characters; retries until it fits."""
    while True:
        used, sents, triples = set(), [], []
        target = rng.choice([1, 2, 2, 3, 3])
        while len(triples) < target:
            kinds = ["part", "part", "perf", "perf", "tool"]
            if target - len(triples) >= 2:
                kinds += ["has2", "has_fault", "has_fault"]
            sent, trs = fact(rng, rng.choice(kinds), used)
            sents.append(sent)
            triples += trs
        for extra in rng.sample(DISTRACTORS, rng.choice([0, 1, 1, 2])):  # sentences with no triple
            sents.insert(rng.randint(0, len(sents)), extra.format(d=rng.randint(2, 30)))
        header = rng.choice(HEADERS).format(n=rng.randint(1000, 99999), v=rng.choice(VEHICLES),
                                            k=rng.choice(MACHINES), h=rng.randint(200, 9000))
        text = header + "".join(sents)
        if 40 <= len(text) <= 120 and len(set(triples)) == len(triples):
            return {"instruction": INSTRUCTION, "input": text, "output": "\n".join(triples)}


def make_split(rng, n, exclude):
    """n records with unique inputs, none of whose inputs are in `exclude`."""
    records, seen = [], set(exclude)
    while len(records) < n:
        rec = make_record(rng)
        if rec["input"] not in seen:
            seen.add(rec["input"])
            records.append(rec)
    return records


def check(records):
    """Every triple uses a known relation and copies head and tail verbatim from the input."""
    for rec in records:
        for triple in rec["output"].split("\n"):
            head, rel, tail = triple.split("_")
            assert rel in ("性能故障", "部件故障", "组成", "检测工具"), triple
            assert head in rec["input"] and tail in rec["input"], (triple, rec["input"])


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", default="data")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--n_train", type=int, default=400)
    ap.add_argument("--n_test", type=int, default=40)
    args = ap.parse_args()

    # Separate random streams per split (seed, seed + 1); train also skips any test input.
    test = make_split(random.Random(args.seed + 1), args.n_test, exclude=())
    train = make_split(random.Random(args.seed), args.n_train,
                       exclude={r["input"] for r in test})
    assert not {r["input"] for r in train} & {r["input"] for r in test}, "train/test overlap"
    check(train + test)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.json", train)
    write_jsonl(out / "test.json", test)
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {"fault_triples_train": {"file_name": "train.json", "columns": cols},
            "fault_triples_test": {"file_name": "test.json", "columns": cols}}
    (out / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2) + "\n",
                                           encoding="utf-8")
    print(f"wrote {len(train)} train / {len(test)} test records to {out}")


if __name__ == "__main__":
    main()
