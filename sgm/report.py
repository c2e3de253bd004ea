"""The report of 04_evaluate.py: results.md (the tables and a reading generated from the numbers), results.png
(the rates) and, for a strength sweep, <report>-tradeoff.png; also reading an earlier report back (--base-from)
and the positive control's line (a model with PLANTED.json, tools/plant.py). What each number means is in
04_evaluate.py's docstring; this file only lays the numbers out.
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import fail, source_id  # noqa: E402
from sgm.artifacts import check_set  # noqa: E402
from sgm.endpoint import NOT_AVAILABLE as NA  # noqa: E402  (a log-probability metric whose server gives none)
from sgm.judges import JUDGE  # noqa: E402
from sgm.neurons import EXPERTISE_SCORES  # noqa: E402


def pct(x):
    return f"{100 * x:.1f}%"


def by_method_condition_label(rows):
    return {(r["method"], r["condition"], r["label"]): r for r in rows}


# ---- reading an earlier report (--base-from) ------------------------------------------------------------------

# What base's answers and fluency depend on: --base-from takes them only from a report made with the same.
# What the demo models' images carry, said at the top of their reports and plots (docs/USAGE.md, "The demo model").
BLIND_DEMOS = ("demo-blind", "demo-planted")  # their images carry no information: a record of the text pathway
DEMO_NOTES = {
    "demo": "demo = Gemma-3-270M behind eyes trained here (sgm/eyes.safetensors): they read typed text in the "
            "benchmark's layout (the typographic condition), and see nothing meaningful in pictures",
    "demo-blind": "demo-blind = Gemma-3-270M in a LLaVA wrapper whose images carry no information: results are about "
                  "the text pathway only",
    "demo-planted": "demo-planted = the blind demo with one planted expert: its images carry no information, results "
                    "are about the text pathway only"}
BASE_SETTINGS = ("split", "conditions", "limits", "fluency_category", "fluency_also", "perplexity_items",
                 "max_new_tokens", "judge_threshold", "judges", "guard_model", "samples", "sample_top_k", "seed",
                 "batch_size", "device")


def read_base(path, cfg, data_checksum, items, probe_items):
    """04_evaluate.py --base-from: base's answers (tokens, toxicity, samples, probe answers) and perplexities from an
    earlier report, in this run's item order (`cfg`: this run's settings). A damaged report, or one of another
    model, data, items or settings: one line naming it."""
    path = Path(path)
    answers_path = path.with_name(f"{path.stem}-answers.jsonl")
    redo = (f"rerun 04_evaluate.py --methods base --report {path.stem} with this run's settings (it writes "
            f"{path.name} and {answers_path.name}), or leave --base-from out")
    try:
        check_set(path)  # the report and its answers are one set (04 writes them behind a manifest)
        report = json.loads(path.read_text(encoding="utf-8"))
        meta, fluency = report["meta"], {f["method"]: f for f in report["fluency"]}["base"]
        rows = [row for row in map(json.loads, answers_path.read_text(encoding="utf-8").splitlines())
                if row["method"] == "base"]
        standard, probe = [r for r in rows if "condition" in r], [r for r in rows if "expected" in r]
        reused = dict(ids=[r["id"] for r in standard], probe_ids=[r["id"] for r in probe],
                      answers=[r["answer"] for r in standard],
                      tokens=[r["tokens"] and list(r["tokens"]) for r in standard],  # None: a server gave no ids
                      scores=np.array([r["toxicity"] for r in standard], dtype=np.float64),
                      samples=[s for r in standard for s in r["samples"] or ()] if cfg["samples"] else None,
                      probe_answers=[r["answer"] for r in probe],
                      text_nlls={g["texts"]: None if g["nll"] is None else np.array(g["nll"], dtype=np.float64)
                                 for g in fluency["genres"]},
                      answer_perplexity=fluency["answer_perplexity"], sites=meta["sites"],
                      found=dict(model=meta["model"], dtype=meta["dtype"], data_checksum=meta["data_checksum"],
                                 **{k: meta["settings"].get(k) for k in BASE_SETTINGS}))
    except Exception as e:  # not found, cut off, not JSON, not a report with base in it
        fail(f"--base-from {path}: cannot read base's results from it and {answers_path.name} "
             f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}): {redo}")
    wanted = dict(model=cfg["model"], dtype=cfg["dtype"], data_checksum=data_checksum,
                  **{k: cfg[k] for k in BASE_SETTINGS})
    for key in wanted:
        if reused["found"][key] != wanted[key]:
            fail(f"--base-from {path} was made with {key} {reused['found'][key]!r}, not {wanted[key]!r}: {redo}")
    if reused["ids"] != [item["id"] for item in items] or reused["probe_ids"] != [item["id"] for item in probe_items]:
        fail(f"--base-from {answers_path} holds other items than this run, or in another order: {redo}")
    return reused


# ---- fluency per genre -----------------------------------------------------------------------------------------

def genre_perplexity(nlls, base_nlls, seed):
    """Per genre (`nlls`: genre -> per-text mean NLL under a method, None where a server gives no log-probabilities;
    `base_nlls` the same under base): the perplexity exp(mean NLL), its change vs base's on the same texts and a 95%
    paired bootstrap interval of that change. The change is exp(mean of the per-text NLL differences) - 1, so the
    interval is the percentile bootstrap of that mean over the texts, mapped through exp - 1."""
    from scipy.stats import bootstrap
    genres = []
    for genre, nll in nlls.items():
        base = base_nlls[genre]
        entry = dict(texts=genre, n=None if nll is None else len(nll), nll=None if nll is None else nll.tolist(),
                     perplexity=None if nll is None else float(np.exp(nll.mean())), change_vs_base=None, change_ci=None)
        if nll is not None and base is not None:
            difference = nll - base
            entry["change_vs_base"] = float(np.expm1(difference.mean()))
            if len(difference) >= 2 and np.ptp(difference) > 0:  # all equal (base itself): no interval to draw
                ci = bootstrap((difference,), np.mean, n_resamples=2000, random_state=seed,
                               method="percentile").confidence_interval
                entry["change_ci"] = [float(np.expm1(ci.low)), float(np.expm1(ci.high))]
        genres.append(entry)
    return genres


# ---- the positive control -------------------------------------------------------------------------------------

def planted_expert(record_file, expertise, alpha_sgm, alpha_random, score="activation"):
    """Where the stages put the planted neuron that `record_file` (PLANTED.json) names: its AUROC, rank, q-value
    and alpha under SGM and under the random control; with a writer score (01 --writer), its rank by what it
    writes too. `score`: the one SGM damped by."""
    record_file = Path(record_file)
    try:
        record = json.loads(record_file.read_text())
        record["flat_index"], record["layer"], record["neuron"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        fail(f"{record_file} is damaged ({type(e).__name__}): delete the folder {record_file.parent} and rerun "
             "`make planted` (python -m tools.plant builds it again)")
    index, auroc = record["flat_index"], expertise["auroc"]

    def rank(values):  # 1 = the highest of all neurons
        return int((values > values[index]).sum()) + 1
    return dict(layer=record["layer"], neuron=record["neuron"], flat_index=index, auroc=float(auroc[index]),
                rank=rank(auroc), n_neurons=int(auroc.size), score_rank=rank(expertise[EXPERTISE_SCORES[score]]),
                q_value=float(expertise["q_value"][index]) if "q_value" in expertise else None,
                alpha_sgm=float(alpha_sgm[index]), alpha_random=float(alpha_random[index]),
                n_silenced=int((alpha_sgm == 0).sum()),
                next_best_auroc=float(np.delete(auroc, index).max()), score=score,
                **({} if "writer" not in expertise else dict(  # what it writes: rank by d, the writer score, and t
                    writer=float(expertise["writer"][index]),
                    writer_rank=rank(expertise["writer"]), writer_t=float(expertise["writer_t"][index]),
                    writer_t_rank=rank(expertise["writer_t"]),
                    writer_q_value=float(expertise["writer_q_value"][index]),
                    next_best_writer=float(np.delete(expertise["writer"], index).max()))))

# ---- results.md -----------------------------------------------------------------------------------------------

def random_draws(text_nlls, draw_nlls, seed):
    """Per fluency genre: the perplexity change vs base under each draw of the random control (the `random`
    method's, seed `seed`, then 04's --random-draws more: `draw_nlls`, seed -> genre -> per-text NLL), their median
    and range, and how many draws cost more than sgm. `text_nlls`: neurons -> genre -> per-text NLL (None where a
    server gives no log-probabilities: that genre is left out). {} without further draws."""
    if not draw_nlls or "random" not in text_nlls:
        return {}
    out = {}
    for genre, base in text_nlls["base"].items():
        if base is None or text_nlls["random"][genre] is None:
            continue
        nlls = {seed: text_nlls["random"][genre], **{s: draw[genre] for s, draw in draw_nlls.items()}}
        changes = np.array([np.exp(nll.mean() - base.mean()) - 1 for nll in nlls.values()])
        sgm = (text_nlls.get("sgm") or {}).get(genre)
        sgm_change = None if sgm is None else float(np.exp(sgm.mean() - base.mean()) - 1)
        out[genre] = dict(seeds=list(nlls), changes=changes.tolist(), median=float(np.median(changes)),
                          low=float(changes.min()), high=float(changes.max()), sgm_change=sgm_change,
                          costlier_than_sgm=None if sgm_change is None else int((changes > sgm_change).sum()))
    return out


def twin_rows(items, scores, methods, threshold):
    """The same source text, two ways in: every evaluated item of a condition other than `standard` paired with its
    evaluated `standard` twin (common.source_id), per method, condition and label: the pairs, each side's toxic-
    language rate, the discordant pairs and the exact McNemar p of the condition against its twin (scipy's binomial
    test on the discordant pairs). For `typographic`: does the text come in through the image as it does typed?
    `scores`: method -> toxicity per item (items order). A group with no evaluated twin gives no row."""
    from scipy.stats import binomtest
    standard = {source_id(item["id"]): i for i, item in enumerate(items) if item["condition"] == "standard"}
    pairs = {}
    for i, item in enumerate(items):
        if item["condition"] != "standard" and source_id(item["id"]) in standard:
            pairs.setdefault((item["condition"], item["label"]), []).append((i, standard[source_id(item["id"])]))
    rows = []
    for method in methods:
        for (condition, label), group in sorted(pairs.items()):
            index, twin = (np.array(side) for side in zip(*group))
            flagged, twin_flagged = scores[method][index] >= threshold, scores[method][twin] >= threshold
            only, only_twin = int((flagged & ~twin_flagged).sum()), int((twin_flagged & ~flagged).sum())
            rows.append(dict(method=method, condition=condition, label=label, n_pairs=len(group),
                             harmful_rate=float(flagged.mean()), standard_rate=float(twin_flagged.mean()),
                             only_condition=only, only_standard=only_twin,
                             p_vs_standard=binomtest(only, only + only_twin).pvalue if only + only_twin else None))
    return rows


def rate_line(row, cfg, extra_judges):
    """One row of a condition's table: the toxic-language rate and what goes with it."""
    p = "" if row["p_vs_base"] is None else f"{row['p_vs_base']:.3g}"
    split = " / ".join("–" if row[k] is None else pct(row[k]) for k in ("harmful_rate_copied", "harmful_rate_novel"))
    judged = "".join(" – |" if row["judges"][judge]["harmful_rate"] is None else
                     f" {pct(row['judges'][judge]['harmful_rate'])} (n={row['judges'][judge]['n_judged']}) |"
                     for judge in extra_judges)
    sampled = ("" if not cfg["samples"] else " – |" if row["expected_max_toxicity"] is None else
               f" {row['expected_max_toxicity']:.3f} / {pct(row['toxicity_probability'])} |")
    return (f"| {row['method']} | {row['label']} | {row['n']} | {pct(row['harmful_rate'])} "
            f"[{pct(row['harmful_ci'][0])}, {pct(row['harmful_ci'][1])}] | {split} "
            f"(n={row['n_prompt_flagged']} / {row['n'] - row['n_prompt_flagged']}) | "
            f"{row['mean_toxicity']:.3f} | {pct(row['refusal_rate'])} | {row['n_changed_vs_base']} | {p} |"
            + judged + sampled)


def markdown(cfg, meta, groups, methods, rows, fluency, selectivity, probe, extra_judges, neurons_of, twins=(),
             draws=None):
    """The report's lines: a table per condition, the same source texts typed and otherwise (twin_rows), fluency
    with the random control's draws (random_draws), the visual probe, selectivity, the planted expert, and a
    reading generated from the numbers.
    `neurons_of(method)`: the neurons a method runs with (04_evaluate.py)."""
    endpoints, planted = meta["endpoints"] or {}, meta["planted"]

    def not_offered(*neurons):
        """Whether a log-probability metric under these neurons is missing because their server offers none."""
        return any(n in endpoints and not endpoints[n]["prompt_logprobs"] for n in neurons)

    lines = [f"# SGM on {cfg['model']}: {cfg['split']} split", ""]
    if meta["demo_note"]:
        lines += [f"**{meta['demo_note']}.**", ""]
    lines += [f"`harmful_rate` = share of answers the offline judge ({JUDGE}, threshold {cfg['judge_threshold']}) "
              "flags as offensive language: a *toxic-language rate*, not the paper's harmful-answer rate. "
              f"Greedy, {cfg['max_new_tokens']} new tokens; 95% Wilson intervals; p = exact McNemar test vs base "
              "on the same items (changed = items whose verdict differs from base); copied / novel = the rate on items "
              "whose prompt the judge itself flags / does not flag; refusal = answers with a refusal phrase.", "",
              f"SGM settings: {json.dumps(meta['suppression'])}; calibration: {json.dumps(meta['calibration'])}.", ""]
    if endpoints:
        lines += ["Generated on servers (--endpoint), each with its alpha baked into the checkpoint: " + "; ".join(
            f"{n} = {e['url']} (`{e['model']}`" + ("" if e["prompt_logprobs"] else f"; log-probabilities {NA}")
            + ")" for n, e in endpoints.items()) + ". Teacher-forced metrics there score each answer's text as the "
            "server tokenizes it.", ""]
    for condition in sorted({c for c, _ in groups}):
        lines += [f"## {condition}", "", "| method | label | n | harmful_rate [95% CI] | copied / novel | mean "
                  "toxicity | refusal | changed | p vs base |" + "".join(f" {judge} judge |" for judge in extra_judges)
                  + (f" sampled x{cfg['samples']}: E[max tox] / P(tox) |" if cfg["samples"] else ""),
                  "|---|---|---:|---|---|---:|---:|---:|---:|" + "---:|" * (len(extra_judges) + bool(cfg["samples"]))]
        lines += [rate_line(row, cfg, extra_judges) for row in rows if row["condition"] == condition]
        lines.append("")
    if twins:
        lines += ["## Same source texts: each condition against its typed twin (the `standard` item of the same text)",
                  "", "Pairs: items of the condition whose standard twin was evaluated too; p = exact McNemar test of "
                  "the condition against its twins (discordant pairs: toxic only there / only typed).", "",
                  "| method | condition | label | pairs | harmful_rate | its standard twins | discordant | p |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['method']} | {t['condition']} | {t['label']} | {t['n_pairs']} | {pct(t['harmful_rate'])} | "
                  f"{pct(t['standard_rate'])} | {t['only_condition']} / {t['only_standard']} | "
                  + ("" if t["p_vs_standard"] is None else f"{t['p_vs_standard']:.2g}") + " |" for t in twins]
        lines.append("")
    genres = fluency[0]["genres"]
    lines += ["## Fluency (lower is better): perplexity of " + " and ".join(f"{g['n']} {g['texts']} texts"
                                                                           for g in genres)
              + " under each method, its change vs base with a 95% paired bootstrap interval over the texts; "
              f"perplexity of each method's answers to the {fluency[0]['n_answers']} benign standard items under the "
              "unmodified model", "",
              "| method |" + "".join(f" {g['texts']} perplexity | vs base [95% CI] |" for g in genres)
              + " answer perplexity |", "|---|" + "---:|---|" * len(genres) + "---:|"]
    lines += [f"| {f['method']} |" + "".join(genre_cells(g) for g in f["genres"]) + " "
              + ((NA if not_offered("base") else "–") if f["answer_perplexity"] is None
                 else f"{f['answer_perplexity']:.2f}") + " |" for f in fluency]
    lines.append("")
    if draws:
        seeds = next(iter(draws.values()))["seeds"]
        lines += [f"The random control drawn {len(seeds)} times (seeds {', '.join(map(str, seeds))}; the row above is "
                  f"seed {seeds[0]}), change vs base: " + "; ".join(
                      f"{genre} median {100 * d['median']:+.1f}% [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                      + ("" if d["sgm_change"] is None else f", costlier than sgm in {d['costlier_than_sgm']}")
                      for genre, d in draws.items()) + ". One draw is a noisy reference for fluency.", ""]

    if probe:
        kinds_shown = list(probe[0]["by_kind"])
        lines += [f"## Visual probe: exact-answer questions about rendered images (chance "
                  f"{pct(probe[0]['chance'])})", "",
                  "| method | n | accuracy [95% CI] |" + "".join(
                      f" {k} (chance {pct(probe[0]['by_kind'][k]['chance'])}; most said) |" for k in kinds_shown),
                  "|---|---:|---|" + "---|" * len(kinds_shown)]
        lines += [f"| {p['method']} | {p['n']} | {pct(p['accuracy'])} [{pct(p['accuracy_ci'][0])}, "
                  f"{pct(p['accuracy_ci'][1])}] |" + "".join(
                      f" {pct(p['by_kind'][k]['accuracy'])} ({p['by_kind'][k]['most_said'] or '–'}) |"
                      for k in kinds_shown)
                  for p in probe]
        lines.append("")
    if selectivity:
        lines += ["## Selectivity: teacher-forced change on base's own answers to standard toxic items", "",
                  f"Offensive answers: {selectivity[0]['n_offensive']}, clean: {selectivity[0]['n_clean']}. "
                  "Change of NLL (nats/token) vs base; selectivity = offensive minus clean (95% bootstrap CI).", "",
                  "| method | ΔNLL offensive | ΔNLL clean | selectivity [95% CI] |", "|---|---:|---:|---|"]
        for entry in selectivity:
            missing = NA if not_offered("base", entry["method"]) else "–"
            fmt = lambda x: missing if x is None else f"{x:+.3f}"  # noqa: E731
            ci = ("" if entry["selectivity_ci"] is None else
                  f" [{entry['selectivity_ci'][0]:+.3f}, {entry['selectivity_ci'][1]:+.3f}]")
            lines.append(f"| {entry['method']} | {fmt(entry['delta_nll_offensive'])} | "
                         f"{fmt(entry['delta_nll_clean'])} | {fmt(entry['selectivity'])}{ci} |")
        lines.append("")
    if planted:
        q = "–" if planted["q_value"] is None else f"{planted['q_value']:.2g}"
        lines += ["## Positive control: the planted toxic expert (tools/plant.py)", "",
                  f"This model has one neuron rewritten into a toxic expert (layer {planted['layer']}, neuron "
                  f"{planted['neuron']}; recorded in PLANTED.json, read by no stage before this report).", "",
                  "| AUROC | rank (of all neurons) | next best AUROC | q-value | SGM alpha "
                  "| random control's alpha there |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {planted['auroc']:.3f} | {planted['rank']} of {planted['n_neurons']} | "
                  f"{planted['next_best_auroc']:.3f} | {q} | {planted['alpha_sgm']:.3f} | "
                  f"{planted['alpha_random']:.3f} |",
                  ""]
        if "writer_rank" in planted:
            lines += [f"What it writes (02_score.py's writer score d and its Welch t; SGM damped by the "
                      f"{planted['score']} score):", "",
                      "| writer score d | rank (of all neurons) | next best d | Welch t | rank by t | q-value |",
                      "|---:|---:|---:|---:|---:|---:|",
                      f"| {planted['writer']:.4g} | {planted['writer_rank']} of {planted['n_neurons']} | "
                      f"{planted['next_best_writer']:.4g} | {planted['writer_t']:.3g} | {planted['writer_t_rank']} | "
                      f"{planted['writer_q_value']:.2g} |", ""]
    lines += ["## Reading (generated from the numbers above)", ""]
    if planted and "writer_rank" in planted:
        lines.append(f"- planted expert by what it writes: rank {planted['writer_rank']} of {planted['n_neurons']} "
                     f"(q = {planted['writer_q_value']:.2g}), against rank {planted['rank']} by what it reads (AUROC).")
    if planted:
        by_writer = planted["score"] != "activation"  # judged by the score SGM damped by
        rank = planted["score_rank"]
        q_found = planted["writer_q_value"] if by_writer else planted["q_value"]
        q = "–" if q_found is None else f"{q_found:.2g}"
        significant = q_found is not None and q_found < 0.05
        lines.append(f"- planted expert: rank {rank}" + (" by what it writes" if by_writer else "") +
                     f", AUROC {planted['auroc']:.3f}, q = {q}, SGM alpha {planted['alpha_sgm']:.3f}: " + (
                         "found (top 10, significant) and damped by the ordinary stages." if rank <= 10 and
                         significant else "in the top 10 but not significant at q < 0.05 (too few calibration items "
                         "to tell it from chance)." if rank <= 10 else
                         f"outside the top 10, yet silenced (among the {planted['n_silenced']} neurons SGM set to "
                         "alpha 0), so damped all the same." if planted["alpha_sgm"] == 0 else
                         "NOT in the top 10: the stages did not single out the known expert. Look for a bug, and "
                         "with `responses` calibration for neurons that respond to the toxic words it makes, which "
                         "can outrank it (docs/RESULTS.md, positive control)."))
    by_key = by_method_condition_label(rows)
    for (condition, label) in groups:
        if label != "toxic":
            continue
        base = by_key["base", condition, label]
        for method in methods[1:]:
            row = by_key[method, condition, label]
            change = row["harmful_rate"] - base["harmful_rate"]
            relative = f" ({100 * change / base['harmful_rate']:+.0f}% relative)" if base["harmful_rate"] else ""
            verdict = ("a significant change at p < 0.05"
                       if row["p_vs_base"] is not None and row["p_vs_base"] < 0.05
                       else "not a significant change (p >= 0.05): no measurable effect at this n")
            lines.append(f"- {condition}, toxic items (n={row['n']}): {method} {pct(base['harmful_rate'])} -> "
                         f"{pct(row['harmful_rate'])}, {100 * change:+.1f} pp{relative}; {verdict}.")
    for t in twins:
        if t["method"] == "base" and t["label"] == "toxic":
            lines.append(f"- {t['condition']} vs the same texts typed (standard), base, toxic items ({t['n_pairs']} "
                         f"pairs): {pct(t['harmful_rate'])} vs {pct(t['standard_rate'])}; " + (
                             "a significant difference at p < 0.05." if t["p_vs_standard"] is not None and
                             t["p_vs_standard"] < 0.05 else "no significant difference (p >= 0.05) at this n."))
    for f in fluency[1:]:
        if neurons_of(f["method"]) == "base" or f["change_vs_base"] is None:
            continue  # same neurons as base: same perplexity; or not available from its server
        lines.append(f"- fluency: {f['method']} changes the perplexity of " + "; of ".join(
            f"the {g['texts']} texts by {100 * g['change_vs_base']:+.1f}%"
            + (f" [{100 * g['change_ci'][0]:+.1f}%, {100 * g['change_ci'][1]:+.1f}%]" if g["change_ci"] else "")
            + f" ({b['perplexity']:.2f} -> {g['perplexity']:.2f})"
            for g, b in zip(f["genres"], genres) if g["change_vs_base"] is not None) + ".")
    for genre, d in (draws or {}).items():
        if d["sgm_change"] is not None:
            n, k = len(d["changes"]), d["costlier_than_sgm"]
            lines.append(f"- fluency against {n} draws of the random control ({genre}): sgm "
                         f"{100 * d['sgm_change']:+.1f}%, random {100 * d['low']:+.1f}% to {100 * d['high']:+.1f}% "
                         f"(median {100 * d['median']:+.1f}%); "
                         + ("sgm costs less than every draw." if k == n else "sgm costs more than every draw."
                            if k == 0 else f"{k} of {n} draws cost more: within what random damping costs."))
    for entry in selectivity:
        if entry["selectivity"] is not None:
            low, high = entry["selectivity_ci"]
            verdict = ("selective for offensive text" if low > 0 else "selective for clean text (the wrong sign)"
                       if high < 0 else "not distinguishable from zero")
            lines.append(f"- selectivity: {entry['method']} {entry['selectivity']:+.3f} nats/token "
                         f"[{low:+.3f}, {high:+.3f}]: {verdict}.")
    return lines


def change_text(change, ci):
    """A perplexity change and its interval, e.g. "+10.2% [+7.7, +13.1]" (tools/tune.py's table too)."""
    return f"{100 * change:+.1f}%" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def genre_cells(genre):
    """One genre's two cells of the fluency table: perplexity, and its change vs base [95% CI]."""
    if genre["perplexity"] is None:
        return f" {NA} | {NA} |"
    change = "–" if genre["change_vs_base"] is None else change_text(genre["change_vs_base"], genre["change_ci"])
    return f" {genre['perplexity']:.2f} | {change} |"


# ---- plots ----------------------------------------------------------------------------------------------------

def plot_rates(path, cfg, groups, methods, rows, draws=None):
    """results.png: the toxic-language rate with its interval, per condition and method, toxic and benign items;
    with the random control drawn several times (random_draws), a third panel: each fluency genre's perplexity
    change under every draw beside sgm's."""
    by_key = by_method_condition_label(rows)
    fig, axes = plt.subplots(1, 3 if draws else 2, figsize=(17 if draws else 12, 4), sharey=False)
    if draws:
        ax = axes[2]
        for x, (genre, d) in enumerate(draws.items()):
            ax.scatter(np.full(len(d["changes"]), x), 100 * np.array(d["changes"]), color="grey", alpha=0.7,
                       label="random control, each draw" if x == 0 else None)
            if d["sgm_change"] is not None:
                ax.scatter([x], [100 * d["sgm_change"]], color="red", marker="D", label="sgm" if x == 0 else None)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(draws)), list(draws))
        ax.set_xlim(-0.5, len(draws) - 0.5)
        ax.set(ylabel="perplexity change vs base (%)", title=f"fluency: {len(next(iter(draws.values()))['changes'])}"
               " draws of the random control")
        ax.legend()
    for ax, label in zip(axes, ("toxic", "benign")):
        conditions = sorted({c for c, lab in groups if lab == label})
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            picked = [by_key[method, c, label] for c in conditions]
            rates = np.array([100 * r["harmful_rate"] for r in picked])
            err = np.array([[100 * (r["harmful_rate"] - r["harmful_ci"][0]),
                             100 * (r["harmful_ci"][1] - r["harmful_rate"])] for r in picked]).T.reshape(2, -1)
            ax.bar(np.arange(len(conditions)) + m * width, rates, width, yerr=err, capsize=3, label=method)
        ax.set_xticks(np.arange(len(conditions)) + width * (len(methods) - 1) / 2, conditions)
        ax.set(ylabel="toxic-language rate (%)", title=f"{label} test items ({JUDGE} >= {cfg['judge_threshold']})")
        ax.legend()
    fig.suptitle(f"{cfg['model']}" + (" (text pathway only, images carry no information)"
                                      if cfg["model"] in BLIND_DEMOS else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(path, cfg, groups, strengths, perplexity, rows, fluency_texts):
    """<report>-tradeoff.png: toxic-language rate vs fluency cost, one line per condition, base = strength 0."""
    by_key = by_method_condition_label(rows)
    sweep = ["base"] + [f"sgm@{s:g}" for s in strengths]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for condition in sorted({c for c, lab in groups if lab == "toxic"}):
        x = [np.nan if None in (perplexity[m], perplexity["base"]) else 100 * (perplexity[m] / perplexity["base"] - 1)
             for m in sweep]  # NaN: not available from its server (the point is left out)
        y = [100 * by_key[m, condition, "toxic"]["harmful_rate"] for m in sweep]
        ax.plot(x, y, "o-", label=condition)
        for xi, yi, s in zip(x, y, [0.0] + strengths):
            ax.annotate(f"{s:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel=f"perplexity change of {fluency_texts} texts (%)", ylabel="toxic-language rate on toxic items (%)",
           title=f"{cfg['model']}, {cfg['split']} split: SGM strength sweep (labels = strength)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
