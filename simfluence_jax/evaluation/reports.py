r"""The experiment report: a self-contained HTML page and a markdown summary.

`write_report(workspace, output_dir)`; the binary is `python -m simfluence_jax.report`.

Outputs (under output_dir): report.html (inline CSS, images as base64 PNG data URIs, no
scripts, no external assets), report.md and the PNG figures it links to.

Inputs, all read-only:
  W/runs/<id>/            the trace contract (traces.read_run); run.json free metadata keys
                          task / model / tuning / seed are shown when present, and
                          {"counterfactual": {"name", "base_run", "description", ["test_id"]}}
                          marks a real retraining under an edited curriculum (section 6).
  W/examples/{train,test}.jsonl   example texts (optional).
  W/fits/<name>/          params.npz + fit.json (fit_params.save_fit) and metrics.json, the
                          `simfluence_jax.evaluate` output; the table's numbers are read from
                          metrics.json, never recomputed.
  W/config.gin            the operative gin config (optional; shown folded).
  W/experiment.json       written by pipeline.write_split (optional):
      {"name": str,
       "split": {"fit": [run ids], "val": [run ids], "heldout": [run ids]},
       "fits": {fit_name: {"simulator": str, "label": str, ...}},   # table order & labels
       ...}
    Without it, every fits/<name> with a metrics.json is reported and the held-out runs are
    the runs named in the metrics.json files' per_run lists.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import pathlib
from typing import Any

import numpy as np

from simfluence_jax.evaluation import attribution
from simfluence_jax.traces import atomic_io
from simfluence_jax.traces import fit_params
from simfluence_jax.yardstick import metrics
from simfluence_jax.evaluation import report_plots
from simfluence_jax.simulators import rollout as rollout_lib
from simfluence_jax.simulators import simfluence as simulators
from simfluence_jax.traces import contract as traces
from simfluence_jax.yardstick import baselines

# Table labels of every `simfluence_jax.fit --simulator` name (experiments use these too).
LABELS = {
    "linear": "Simfluence-Linear (default: best-validated variant)",
    "additive": "Simfluence-Additive (best-validated variant)",
    "multiplicative": "Simfluence-Multiplicative (best-validated variant)",
    "linear_paper": "Simfluence-Linear (paper)",
    "additive_paper": "Simfluence-Additive = TracIn-Ideal (paper)",
    "tracin_ideal": "Simfluence-Additive = TracIn-Ideal (paper)",
    "multiplicative_paper": "Simfluence-Multiplicative (paper)",
    "tracin_cp": "TracIn-CP (10 ckpts)",
    "tracin_cp_all": "TracIn-CP (all steps)",
    "influence": "Influence functions (EK-FAC)",
    "source": "Source (EK-FAC, segments)",
    "hypothetical_linear": "Hypothetical Simfluence-Linear",
    "featurized": "Featurized Simfluence (rank 4)",
}
for _kind in ("linear", "additive", "multiplicative"):
  for _variant in ("centred", "gamma", "rho_gamma", "lowrank"):
    LABELS.setdefault(f"{_kind}_{_variant}",
                      f"Simfluence-{_kind.capitalize()} ({_variant.replace('_', '+')})")
VARIANT_LABELS = {"paper": "paper", "centred": "centred", "gamma": "+γ_t",
                  "rho_gamma": "+ρ_t, γ_t", "lowrank": "+ρ_t, γ_t, rank-1 prior"}
GROUND_TRUTH_FLAG = "uses ground-truth rescaling"
NUM_EXAMPLES = 6
TOP_K = 3


def format_number(x: Any) -> str:
  """3 significant digits (the table's format); nan/None as an em dash."""
  if x is None or not np.isfinite(float(x)):
    return "—"
  return f"{float(x):.3g}"


def format_pm(summary: dict) -> str:
  return f"{format_number(summary.get('mean'))} ± {format_number(summary.get('std'))}"


@dataclasses.dataclass
class Fit:
  name: str
  label: str
  params: fit_params.FitParams
  diagnostics: dict
  metrics: dict

  @property
  def rescaled(self) -> bool:
    return bool(self.diagnostics.get("rescale") or self.metrics.get("rescale"))


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None


def load_fits(workspace, experiment: dict | None) -> list[Fit]:
  """The fits to report, in experiment.json order (else by name), each with metrics.json."""
  fits_dir = pathlib.Path(workspace) / "fits"
  declared = (experiment or {}).get("fits") or {}
  names = list(declared) or sorted(p.name for p in fits_dir.glob("*") if p.is_dir())
  out = []
  for name in names:
    m = _read_json(fits_dir / name / "metrics.json")
    if m is None:
      if declared:
        raise FileNotFoundError(f"{fits_dir / name / 'metrics.json'}: fit {name!r} is named "
                                "in experiment.json but was not evaluated; run "
                                "simfluence_jax.evaluate first")
      continue
    params, diag = fit_params.load_fit(workspace, name)
    sim = declared.get(name, {}).get("simulator") or diag.get("simulator") or params.kind
    label = declared.get(name, {}).get("label") or LABELS.get(sim, name)
    out.append(Fit(name, label, params, diag, m))
  if not out:
    raise FileNotFoundError(f"{fits_dir}: no fit has a metrics.json; run "
                            "simfluence_jax.evaluate first")
  return out


def simulate(fit: Fit, run: traces.RunTrace) -> np.ndarray:
  """fit's rollout on run [T+1, m] (σ-rescaled as evaluate did, for TracIn-CP fits)."""
  pred = simulators.simulate_run(fit.params, run, unseen="mean")
  sigma = (fit.metrics.get("sigma") or {}).get(run.run_id)
  if fit.rescaled and sigma is not None:
    pred = pred.copy()
    pred[1:] *= np.asarray(sigma, np.float32)
  return pred


def _examples(workspace, split: str) -> dict[int, dict]:
  if not traces.examples_path(workspace, split).exists():
    return {}
  return traces.read_examples(workspace, split)


def _text(examples: dict, ex_id: int, width: int = 90) -> str:
  ex = examples.get(int(ex_id))
  text = f"#{int(ex_id)}: " + (f"{ex['inputs']} → {ex['targets']}" if ex else "(no text)")
  return text if len(text) <= width else text[:width - 1] + "…"


class _Page:
  """Collects HTML and markdown side by side; figures go to both."""

  def __init__(self, output_dir: pathlib.Path):
    self.out = output_dir
    self.html: list[str] = []
    self.md: list[str] = []
    self.num_images = 0

  def heading(self, text: str, level: int = 2):
    self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")
    self.md.append(f"\n{'#' * level} {text}\n")

  def para(self, text: str):
    self.html.append(f"<p>{html.escape(text)}</p>")
    self.md.append(text + "\n")

  def figure(self, png: bytes, name: str, caption: str):
    atomic_io.write_bytes(self.out / name, png)
    data = base64.b64encode(png).decode("ascii")
    self.html.append(f'<figure><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                     "</figcaption></figure>")
    self.md.append(f"![{caption}]({name})\n")
    self.num_images += 1

  def table(self, header: list[str], rows: list[list[str]], bold: set = frozenset()):
    """bold: {(row, col)} cells to emphasise."""
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
      tds = "".join(f"<td>{'<b>' if (i, j) in bold else ''}{html.escape(c)}"
                    f"{'</b>' if (i, j) in bold else ''}</td>" for j, c in enumerate(row))
      body.append(f"<tr>{tds}</tr>")
    self.html.append(f"<table><tr>{cells}</tr>{''.join(body)}</table>")
    self.md.append("| " + " | ".join(header) + " |")
    self.md.append("|" + "---|" * len(header))
    for i, row in enumerate(rows):
      self.md.append("| " + " | ".join(f"**{c}**" if (i, j) in bold else c
                                       for j, c in enumerate(row)) + " |")
    self.md.append("")


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#222;line-height:1.4}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;
padding-bottom:3px;margin-top:28px}.meta{color:#555;font-size:14px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 10px;text-align:left}
th{background:#f6f6f6}figure{margin:10px 0}img{max-width:100%}
figcaption{color:#666;font-size:13px}.flag{color:#b35900;font-size:12px}
details{font-size:13px;color:#444}pre{background:#f7f7f7;padding:8px;overflow:auto}
"""


def _header(page: _Page, workspace: pathlib.Path, experiment, run_ids, heldout, first_run):
  name = (experiment or {}).get("name") or workspace.name
  page.heading(f"Simfluence report: {name}", 1)
  meta = first_run.metadata if first_run is not None else {}
  facts = [f"{k}: {meta[k]}" for k in ("task", "model", "tuning") if k in meta]
  split = (experiment or {}).get("split") or {}
  counts = ", ".join(f"{k} {len(split.get(k, []))}" for k in ("fit", "val", "heldout")
                     ) if split else f"held-out {len(heldout)} (from metrics.json)"
  facts.append(f"runs: {len(run_ids)} ({counts})")
  page.html.append('<p class="meta">' + " &nbsp;|&nbsp; ".join(
      f"<b>{html.escape(f.split(': ', 1)[0])}</b>: {html.escape(f.split(': ', 1)[1])}"
      for f in facts) + "</p>")
  page.md.append(" | ".join(facts) + "\n")
  gin = workspace / "config.gin"
  if gin.is_file():
    page.html.append("<details><summary>config.gin</summary><pre>"
                     f"{html.escape(gin.read_text()[:20000])}</pre></details>")


def _variant(f: Fit) -> str:
  v = f.diagnostics.get("variant")
  if v is None:
    return "–"
  text = VARIANT_LABELS.get(v, v)
  edge = f.diagnostics.get("grid_edge") or {}
  return text + (" (λ at grid edge: " + ", ".join(f"{k} {e}" for k, e in edge.items()) + ")"
                 if edge else "")


def _results_table(page: _Page, fits: list[Fit]):
  page.heading("1. Held-out accuracy (Table 1), beside ignoring the curriculum")
  base = next((f.metrics["baselines"] for f in fits if f.metrics.get("baselines")), None)
  rows, cells = [], []
  for f in fits:
    timing = (f.diagnostics.get("timings_s") or {}).get("total")
    label = f.label + (f" [{GROUND_TRUTH_FLAG}]" if f.rescaled else "")
    lam = format_number(f.metrics.get("lam", f.params.lam))
    if f.diagnostics.get("lam_b") is not None and f.params.kind == "linear":
      lam = f"λ_A {lam}, λ_B {format_number(f.diagnostics['lam_b'])}"
    cells.append((label, _variant(f), lam, f.metrics, format_number(timing)))
  for name, m in (base or {}).items():
    cells.append((baselines.LABELS.get(name, name), "no curriculum", "–", m, "–"))
  cols = [("mse", min), ("curriculum_r2", max), ("spearman", max), ("across_run", max)]

  def value(m, key):
    v = m.get(key)
    v = v.get("mean") if isinstance(v, dict) else v
    return np.nan if v is None or not np.isfinite(v) else float(v)
  bold = set()
  for j, (key, pick) in enumerate(cols):
    vals = [value(c[3], key) for c in cells]
    if np.isfinite(vals).any():
      best = (np.nanargmin if pick is min else np.nanargmax)(vals)
      bold.add((int(best), 3 + j))
  for label, variant, lam, m, timing in cells:
    across = m.get("across_run") or {}
    across_text = (format_number(across.get("mean")) +
                   (f" ({across['n_defined']}/{across['n']})" if across.get("n") else ""))
    rows.append([label, variant, lam, format_pm(m["mse"]),
                 format_number(m.get("curriculum_r2")), format_pm(m["spearman"]),
                 across_text, timing, str(len(m.get("per_run", [])))])
  page.table(["Method", "Variant", "λ", "All-steps MSE ↓", "Curriculum R² ↑",
              "Final-step Spearman ↑", "Across-run ↑", "fit s", "held-out runs"], rows, bold)
  page.para("Mean ± std (ddof=0) over held-out runs, from each fit's metrics.json "
            "(simfluence_jax.evaluate). Best per column in bold. The last rows ignore the "
            "curriculum: the mean trajectory of the fit runs, and the initial loss. "
            "Curriculum R² = 1 − Σ(L − L̂)²/Σ(L − L̄)² over held-out runs and steps, L̄ the "
            "mean trajectory: > 0 means a method beats ignoring the curriculum. Across-run: "
            "per test example, Spearman over held-out runs of simulated vs observed final "
            "loss, averaged (defined/total test examples; undefined for a prediction that "
            "is the same in every run).")


def _trajectory_section(page, fits, run, test_examples, colors):
  page.heading(f"2. Simulated vs observed trajectories (Figure 1/2), run {run.run_id}")
  final = np.asarray(run.losses[-1], np.float64)
  ok = np.flatnonzero(np.isfinite(final))
  order = ok[np.argsort(final[ok], kind="stable")]
  cols = [int(order[i]) for i in np.unique(
      np.linspace(0, len(order) - 1, min(NUM_EXAMPLES, len(order))).round().astype(int))]
  preds = {f.label: simulate(f, run) for f in fits}
  titles = [_text(test_examples, run.test_ids[c], 84) for c in cols]
  page.figure(report_plots.trajectories(run.losses, preds, cols, titles, colors),
              "trajectories.png", f"Test examples spread over final-loss quantiles in "
              f"held-out run {run.run_id}: observed (black) vs simulated (dashed).")
  return cols


def _scatter_section(page, fits, heldout_runs, colors):
  page.heading("3. Simulated vs observed final losses (held-out runs)")
  points = {}
  for f in fits:
    true = np.concatenate([np.asarray(r.losses[-1], np.float64) for r in heldout_runs])
    pred = np.concatenate([simulate(f, r)[-1].astype(np.float64) for r in heldout_runs])
    points[f.label] = (true, pred, f.metrics["spearman"]["mean"])
  page.figure(report_plots.final_loss_scatter(points, colors), "final_losses.png",
              "Each point is one (held-out run, test example); legend: mean final-step "
              "Spearman over runs from metrics.json.")


def _attribution_section(page, best: Fit, run, cols, train_examples, test_examples):
  page.heading(f"4. Top proponents and opponents ({best.label}, run {run.run_id})")
  params, _ = simulators.impute_unseen(best.params, run.curriculum)
  sub = fit_params.select_tests(params, simulators.columns_of(params, run)[cols])
  rho, gamma = sub.step_terms()
  effects = attribution.repacked_removal_effects(
      sub.A, sub.B, kind=params.kind,
      batches=rollout_lib.ids_to_positions(run.curriculum, params.train_ids),
      initial_losses=np.asarray(run.losses[0], np.float32)[cols], rho=rho, gamma=gamma,
      beyond=params.beyond)
  ranking = attribution.rank(np.asarray(effects), params.train_ids, TOP_K)
  page.para("Simulated leave-one-out effect on the final loss (repacked_removal_effects: "
            "final loss without the example, batches re-packed, − with it; > 0 proponent, "
            "< 0 opponent).")
  rows = []
  for i, c in enumerate(cols[:3]):
    first = True
    for kind, ids, scores in (("proponent", ranking.proponent_ids, ranking.proponent_scores),
                              ("opponent", ranking.opponent_ids, ranking.opponent_scores)):
      for ex_id, score in zip(ids[i], scores[i]):
        if ex_id >= 0:  # the test example's text only on its first row
          rows.append([_text(test_examples, run.test_ids[c], 60) if first else "", kind,
                       _text(train_examples, ex_id, 70), format_number(score)])
          first = False
  page.table(["Test example", "", "Training example", "effect"], rows)


def _counterfactual_section(page, workspace, fits, cf_runs, colors, test_examples,
                            fit_runs=()):
  all_run_ids = set(traces.list_runs(workspace))
  page.heading("5. Counterfactual check: real retrainings under edited curricula")
  if not cf_runs:
    page.para("No counterfactual runs in this workspace (run.json metadata without "
              "'counterfactual').")
    return
  rows = []
  for idx, run in enumerate(cf_runs):
    cf = run.metadata["counterfactual"]
    base = None
    if cf.get("base_run") in all_run_ids:
      base = traces.read_run(workspace, cf["base_run"])
    elif cf.get("base_run"):
      page.para(f"{run.run_id}: base run {cf['base_run']!r} is not in this workspace; "
                "changes relative to it are not shown.")
    cols_named = {int(t): j for j, t in enumerate(run.test_ids.tolist())}
    target = cols_named.get(int(cf["test_id"])) if cf.get("test_id") is not None else None
    def panels(losses, ids):
      mean = np.nanmean(np.asarray(losses, np.float64), axis=1, keepdims=True)
      if target is None:
        return mean
      col = list(ids.tolist()).index(int(cf["test_id"])) if int(cf["test_id"]) in ids else None
      tgt = np.asarray(losses, np.float64)[:, [col]] if col is not None else mean * np.nan
      return np.concatenate([mean, tgt], axis=1)
    sims, base_sims = {}, {}
    for f in fits:
      sims[f.label] = simulate(f, run)
      if base is not None:
        base_sims[f.label] = simulate(f, base)
    titles = ["mean over test examples"] + (
        [f"target {_text(test_examples, cf['test_id'], 70)}"] if target is not None else [])
    page.figure(report_plots.counterfactual(
        panels(run.losses, run.test_ids),
        panels(base.losses, base.test_ids) if base is not None else None,
        {k: panels(v, run.test_ids) for k, v in sims.items()}, colors, titles),
        f"counterfactual_{idx}.png", f"{cf.get('name', run.run_id)}: "
        f"{cf.get('description', '')} (simulated from the run's own L_0)")
    real_change = (float(np.nanmean(run.losses[-1]) - np.nanmean(base.losses[-1]))
                   if base is not None else float("nan"))
    for f in fits:
      sim_change = float("nan")
      if base is not None:
        sim_change = float(np.mean(sims[f.label][-1]) - np.mean(base_sims[f.label][-1]))
      rows.append([str(cf.get("name", run.run_id)), f.label,
                   format_number(metrics.all_steps_mse(sims[f.label], run.losses)),
                   format_number(metrics.final_step_spearman(sims[f.label], run.losses)),
                   format_number(real_change), format_number(sim_change)])
    if base is not None and fit_runs:
      for name, preds in baselines.predictions(fit_runs, [run, base]).items():
        sim_change = float(np.mean(preds[run.run_id][-1]) - np.mean(preds[base.run_id][-1]))
        rows.append([str(cf.get("name", run.run_id)), baselines.LABELS[name],
                     format_number(metrics.all_steps_mse(preds[run.run_id], run.losses)),
                     format_number(metrics.final_step_spearman(preds[run.run_id],
                                                               run.losses)),
                     format_number(real_change), format_number(sim_change)])
  page.table(["Counterfactual", "Method", "MSE", "Spearman", "real Δ final loss",
              "simulated Δ"], rows)
  page.para("Δ = mean final test loss of the edited run − of its base run. The "
            "no-curriculum rows predict a change only through the run's length (a shorter "
            "re-packed run stops earlier on the mean trajectory).")


def _study_section(page, workspace: pathlib.Path):
  """7. The data-efficiency study (simfluence_jax.study), when the pipeline ran it."""
  path = workspace / "study" / "data_efficiency.json"
  if not path.exists():
    return
  rows = _read_json(path)["rows"]
  page.heading("7. Data efficiency: held-out accuracy vs number of past runs")
  page.para("Simfluence-Linear (the paper's model: one simulator per test example, 2n "
            "parameters each) vs the featurized simulator (rank-4 factors shared across test "
            "examples), fitted on the first N fit runs and scored on the held-out runs, with "
            "the mean trajectory of the same N runs as the no-curriculum baseline. 'unseen' "
            "counts held-out train examples the N-run fit never saw (imputed by the mean of "
            "seen ones).")
  page.table(["past runs", "simulator", "all-steps MSE", "curriculum R²",
              "final-step Spearman", "unseen", "fit s"],
             [[str(r["num_runs"]), r["simulator"],
               format_pm({"mean": r["mse_mean"], "std": r["mse_std"]}),
               format_number(r.get("curriculum_r2")),
               format_pm({"mean": r["spearman_mean"], "std": r["spearman_std"]}),
               "–" if r.get("num_unseen_train_ids") is None else str(r["num_unseen_train_ids"]),
               format_number(r["fit_s"])] for r in rows])


def _quality_section(page, fits):
  page.heading("6. Data-quality notes (identifiability, Appendix A.2)")
  any_note = False
  for f in fits:
    ident = f.diagnostics.get("identifiability") or {}
    unident = ident.get("unidentified") or {}
    const = ident.get("constant_loss") or []
    if unident or const:
      any_note = True
      n_pairs = sum(len(v) for v in unident.values())
      page.para(f"{f.label}: {len(unident)} test examples with under-determined train "
                f"examples ({n_pairs} pairs; e.g. " + ", ".join(
                    f"test {k}: {v[:5]}" for k, v in list(unident.items())[:3]) +
                f"); constant-loss test examples: {const[:20] or 'none'}")
  if not any_note:
    page.para("Every fit: all train examples seen ≥ 2 times and no constant-loss test "
              "example.")


def write_report(workspace, output_dir=None) -> dict:
  """Builds the report; returns {"html", "markdown", "images"}."""
  workspace = pathlib.Path(workspace)
  out = pathlib.Path(output_dir) if output_dir else workspace / "report"
  out.mkdir(parents=True, exist_ok=True)
  experiment = _read_json(workspace / "experiment.json")
  fits = load_fits(workspace, experiment)
  run_ids = traces.list_runs(workspace)
  heldout = list(((experiment or {}).get("split") or {}).get("heldout") or [])
  if not heldout:
    heldout = list(dict.fromkeys(r["run_id"] for f in fits
                                 for r in f.metrics.get("per_run", [])))
  heldout_runs = [traces.read_run(workspace, r) for r in heldout]
  if not heldout_runs:
    raise ValueError(f"{workspace}: no held-out runs (experiment.json split or metrics.json "
                     "per_run)")
  all_runs = {r: traces.read_run(workspace, r) for r in run_ids}
  cf_runs = [r for r in all_runs.values() if isinstance(r.metadata.get("counterfactual"), dict)]
  train_examples, test_examples = _examples(workspace, "train"), _examples(workspace, "test")
  colors = report_plots.color_for([f.label for f in fits])

  page = _Page(out)
  _header(page, workspace, experiment, run_ids, heldout, heldout_runs[0])
  _results_table(page, fits)
  cols = _trajectory_section(page, fits, heldout_runs[0], test_examples, colors)
  _scatter_section(page, fits, heldout_runs, colors)
  simfluence = [f for f in fits if not f.rescaled] or fits
  best = min(simfluence, key=lambda f: np.nan_to_num(f.metrics["mse"]["mean"], nan=np.inf))
  _attribution_section(page, best, heldout_runs[0], cols, train_examples, test_examples)
  fit_run_ids = next((f.diagnostics.get("fit_runs") for f in fits
                      if f.diagnostics.get("fit_runs")), [])
  fit_runs = [all_runs[r] for r in fit_run_ids if r in all_runs]
  _counterfactual_section(page, workspace, fits, cf_runs, colors, test_examples, fit_runs)
  _quality_section(page, fits)
  _study_section(page, workspace)

  title = html.escape((experiment or {}).get("name") or workspace.name)
  doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Simfluence: {title}"
         f"</title><style>{_CSS}</style></head><body>{''.join(page.html)}</body></html>")
  atomic_io.write_bytes(out / "report.html", doc.encode("utf-8"))
  atomic_io.write_bytes(out / "report.md", "\n".join(page.md).encode("utf-8"))
  return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
          "images": page.num_images}
