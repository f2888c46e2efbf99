r"""The experiment report: a self-contained HTML page and a markdown summary.

`write_report(workspace, output_dir)`; the binary is `python -m simfluence_jax.report`.

Outputs (under output_dir): report.html (inline CSS, images as base64 PNG data URIs, no
scripts, no external assets), report.md and the PNG figures it links to.

Inputs, all read-only:
  W/runs/<id>/            the trace contract (traces.read_run); run.json free metadata keys
                          task / model / tuning / seed are shown when present.
  W/counterfactuals/scores.json, deltas.npz   the counterfactual bank's scores and per-pair
                          Δ (experiments/counterfactual_bank.py; section 5), when present.
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


CF_DIR = "counterfactuals"           # experiments/counterfactual_bank.py writes these
MG_DIR = "counterfactuals/metagradient"   # experiments/metagradient_bank.py writes these
_TRAJ_METHODS = ("linear", "linear_paper", "additive", "tracin_cp", "metagradient",
                 "mean_trajectory")


def _cell(v, digits=2):
  return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (
      f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _counterfactual_section(page, workspace, colors):
  """5. The counterfactual bank: every method on the change it predicts (scores.json).

  colors: fit name -> the fit's color in the other figures."""
  page.heading("5. Counterfactual bank: the change each method predicts, vs retraining")
  scores = _read_json(workspace / CF_DIR / "scores.json")
  if not scores or not scores.get("methods"):
    page.para("No counterfactual scores in this workspace (the pipeline's bench, "
              "removal_test and counterfactuals stages write them; or run `python -m "
              "simfluence_jax.counterfactuals`).")
    return
  bench = scores.get("bench") or {}
  spec = bench.get("spec") or {}
  page.para(f"{scores['runs']} edited curricula retrained for real (bench version "
            f"{bench.get('version', '–')}, seed {spec.get('seed', '–')}, from "
            f"{spec.get('num_base_runs', '–')} held-out base runs; generated without "
            "looking at any method). Δ = edited − base final loss per (edit, test "
            "example); each method simulates both runs from their own L_0. Within-group: "
            "per edit, each answer group's mean Δ removed first (what a method knows beyond "
            "which label an edit favours). Datamodeling: per test example, Spearman over the "
            "half-subset runs of simulated vs observed final loss, averaged. The last two "
            "rows ignore the curriculum.")
  methods = scores["methods"]
  labels = {n: m["label"] for n, m in methods.items()}
  rows = []
  for name, m in methods.items():
    o = m.get("overall", {})
    dm = m.get("datamodeling") or {}
    rows.append([labels[name], _cell(o.get("pearson")), _cell(o.get("pearson_within")),
                 _cell(o.get("spearman")), _cell(o.get("sign")),
                 f"{_cell(o.get('mean_sim'), 4)} ({_cell(o.get('mean_obs'), 4)})",
                 _cell(dm.get("mean")), str(o.get("n", "–"))])
  page.table(["Method", "Pearson", "Pearson within groups", "Spearman", "sign agreement",
              "mean Δ sim (obs)", "datamodeling", "pairs"], rows)
  kinds = scores.get("kinds") or []
  rows = []
  for name, m in methods.items():
    cells = []
    for k in kinds:
      v = (m.get("kinds") or {}).get(k, {})
      cells.append(f"{_cell(v.get('pearson'))} / {_cell(v.get('pearson_within'))}")
    rows.append([labels[name]] + cells)
  page.para("Per edit kind: Pearson / within-group Pearson of simulated vs observed Δ.")
  page.table(["Method"] + kinds, rows)
  first = next(iter(methods.values()))
  rows = [["observed"] + [_cell((first.get("kinds") or {}).get(k, {}).get("mean_obs"), 4)
                          for k in kinds]]
  for name, m in methods.items():
    cells = []
    for k in kinds:
      v = (m.get("kinds") or {}).get(k, {})
      mark = {True: " ✓", False: " ✗"}.get(v.get("sign_of_mean"), "")
      cells.append(_cell(v.get("mean_sim"), 4) + mark)
    rows.append([labels[name]] + cells)
  page.para("Mean Δ per kind; ✓ = the simulated mean has the observed sign overall and in "
            "every answer group.")
  page.table(["Mean Δ"] + kinds, rows)
  deltas = workspace / CF_DIR / "deltas.npz"
  if deltas.exists():
    with np.load(deltas, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    obs = arrays.get("obs")
    points = {}
    for name in methods:
      sim = arrays.get(f"sim__{name}")
      if obs is not None and sim is not None:
        o = methods[name].get("overall", {})
        points[labels[name]] = (obs, sim, f"r = {_cell(o.get('pearson'))}, within "
                                           f"{_cell(o.get('pearson_within'))}")
    # the fits keep their colors of the other figures; the baselines are greys
    fixed = {"mean_trajectory": "#555555", "initial_loss": "#aaaaaa",
             "metagradient": "#17becf"}
    cmap = {labels[n]: fixed.get(n) or colors.get(n, "#888888") for n in methods}
    if points:
      page.figure(report_plots.delta_scatter(points, cmap), "counterfactual_scatter.png",
                  "Simulated vs observed Δ final loss, every (edit, test example) pair "
                  "(≤ 3,000 shown per panel)")
    chosen = [n for n in _TRAJ_METHODS if n in methods]
    panels = {}
    for k in kinds:
      key = k.replace("/", "__")
      if f"traj_obs__{key}" in arrays:
        panels[k] = (arrays[f"traj_obs__{key}"],
                     {labels[n]: arrays[f"traj_sim__{n}__{key}"] for n in chosen
                      if f"traj_sim__{n}__{key}" in arrays})
    if panels:
      page.figure(report_plots.delta_trajectories(panels, cmap), "counterfactual_deltas.png",
                  "Mean Δ_t = edited − base loss per step, per edit kind: observed at the "
                  "recorded steps (black) vs simulated")
  if scores.get("removal_test"):
    rows = [[r["method"], str(r["target_id"]), str(r["k"]), _cell(r.get("predicted_rise"), 4),
             _cell(r.get("observed_rise"), 4), _cell(r.get("observed_mean_rise_all_tests"), 4)]
            for r in scores["removal_test"]]
    page.para("Removal test: each method's own top-k proponents of a target removed (masked) "
              "from the first held-out run and retrained; the target's rise in final loss "
              "(a good attribution makes it large), beside the mean over all test examples.")
    page.table(["Method", "target", "k", "predicted rise", "observed rise",
                "observed mean over tests"], rows)
  _metagradient_section(page, workspace)


def _metagradient_section(page, workspace):
  """The metagradient's cost and forms (cost.json) and the oracle check (oracle.json)."""
  cost = _read_json(workspace / MG_DIR / "cost.json")
  if cost:
    forms = {}
    for b in cost["bases"].values():
      for f, n in b["forms"].items():
        forms[f] = forms.get(f, 0) + n
    page.para(
        f"Metagradient: exact derivatives through every training step and the optimizer's "
        f"state (forward mode), first order in the edit's weight change: masked edits "
        f"({forms.get('masked', 0)}) are weights 1 → 0 on the removed slots; reorders "
        f"({forms.get('aligned', 0)}) the straight path from the base's batches to the "
        f"edit's; edits of another length ({forms.get('reweighted', 0)}: repacked removals, "
        f"repeats) each example reweighted where the base saw it (what is seen changes, not "
        f"when). {cost['edits']} edits in {cost['seconds']:.0f} s.")
  oracle = _read_json(workspace / MG_DIR / "oracle.json")
  if oracle and oracle.get("steps"):
    fits = oracle["fits"]
    rows = [[t, f"{r['exact_abs_mean']:.2e}"] + [
        f"{_cell(r['fits'][f]['pearson'])} / {_cell(r['fits'][f]['pearson_within_test'])}"
        f" / {_cell(r['fits'][f]['slope'])}" if f in r["fits"] else "–" for f in fits]
        for t, r in oracle["steps"].items()]
    page.para(f"Oracle: the exact one-step effect dL_t(z)/dε of adding each train example "
              f"to step t of fit run {oracle['run']}, against each fit's one-step derivative "
              "(A_p − Ā_c)·L_{t−1}(z) + (B_p − B̄_c): Pearson over all (example, test "
              "example) pairs / mean over test examples of the Pearson over examples / "
              "slope of simulated on exact (1 = the right size). A_i, B_i do not depend on "
              "the step; the exact effect does.")
    page.table(["step", "exact mean abs. effect"] + [_cell(f) for f in fits], rows)


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
  _counterfactual_section(page, workspace, {f.name: colors[f.label] for f in fits})
  _quality_section(page, fits)
  _study_section(page, workspace)

  title = html.escape((experiment or {}).get("name") or workspace.name)
  doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Simfluence: {title}"
         f"</title><style>{_CSS}</style></head><body>{''.join(page.html)}</body></html>")
  atomic_io.write_bytes(out / "report.html", doc.encode("utf-8"))
  atomic_io.write_bytes(out / "report.md", "\n".join(page.md).encode("utf-8"))
  return {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
          "images": page.num_images}
