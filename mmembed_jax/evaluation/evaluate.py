"""One evaluation of a model: MMEB (V1, V2) and/or ViDoRe-style sets, sharded over every device.

  result, tables = evaluate("runs/moca_cl", mmeb="data/MMEB-eval", vidore="data/vidore")
  result, tables = evaluate("runs/moca_cl", mmeb_v2="data/MMEB-V2", tasks=["image", "visdoc"])

`model` is a Hugging Face directory or a training run (workdir or WORKDIR/checkpoints/STEP),
read by `JaxEmbedder.load`. Rows that cannot be embedded are skipped and named (the evaluators'
bad rows), never fatal.
"""
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple


def evaluate(model: str, *, mmeb: Optional[str] = None, datasets: Optional[Sequence[str]] = None,
             image_root: Optional[str] = None, max_rows: Optional[int] = None,
             vidore: Optional[str] = None, vidore_datasets: Optional[Sequence[str]] = None,
             query_template: Optional[str] = None, document_template: Optional[str] = None,
             batch_size: int = 32, max_length: int = 8192, dtype: Optional[str] = None,
             scoring: str = "pytrec_eval", mmeb_v2: Optional[str] = None,
             tasks: Optional[Sequence[str]] = None, mmeb_v2_out: Optional[str] = None
             ) -> Tuple[Dict[str, Any], List[str]]:
  """(results: {"model", MMEB's "overall"/"per_task"/"per_dataset"/"details", "vidore",
  "mmeb_v2", "throughput"}, the console tables). mmeb_v2_out: where MMEB-V2's per-task files
  and submission JSON go (evaluation/mmeb_v2.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmembed_jax.embedding import JaxEmbedder  # pylint: disable=g-import-not-at-top
  from mmembed_jax.evaluation import mmeb as mmeb_lib, mmeb_v2 as mmeb_v2_lib, vidore as vidore_lib  # pylint: disable=g-import-not-at-top
  from mmembed_jax.training.trained_model import export_mesh  # pylint: disable=g-import-not-at-top
  mesh = export_mesh()
  embedder = JaxEmbedder.load(model, dtype=dtype, batch_size=batch_size, max_length=max_length,
                              mesh=mesh)
  counts = {"rows": 0, "seconds": 0.0}

  def embed(rows):
    start = time.perf_counter()
    out = embedder.try_embed_rows(rows)  # rows that fail are skipped and named, not raised
    counts["rows"] += len(rows)
    counts["seconds"] += time.perf_counter() - start
    return out

  result: Dict[str, Any] = {"model": model}
  tables = []
  if mmeb:
    result.update(mmeb_lib.evaluate_mmeb(embed, mmeb, datasets, image_root, max_rows))
    tables.append(mmeb_lib.format_table(result))
  if vidore:
    templates = {k: v for k, v in (("query_template", query_template),
                                   ("document_template", document_template)) if v}
    result["vidore"] = vidore_lib.evaluate_vidore(embed, vidore, mesh, vidore_datasets,
                                                  scoring=scoring, **templates)
    tables.append(vidore_lib.format_table(result["vidore"]))
  if mmeb_v2:
    result["mmeb_v2"] = mmeb_v2_lib.evaluate_mmeb_v2(embed, mmeb_v2, mesh, tasks, max_rows,
                                                     scoring)
    tables.append(mmeb_v2_lib.format_table(result["mmeb_v2"]))
    if mmeb_v2_out and jax.process_index() == 0:
      metadata = {"model_name": model, "embedding_dimension": embedder.dim,
                  "max_length_tokens": max_length}
      tables.append(f"wrote {mmeb_v2_lib.write_results(result['mmeb_v2'], mmeb_v2_out, metadata)}")
  result["throughput"] = {
      "rows_embedded": counts["rows"], "rows_encoded_here": embedder.rows_encoded,
      "embed_seconds": counts["seconds"],
      "rows_per_second": counts["rows"] / max(counts["seconds"], 1e-9),
      "compiled_batch_shapes": len(embedder.batch_shapes), "devices": mesh.size}
  tables.append(f"{counts['rows']} rows embedded in {counts['seconds']:.1f}s "
                f"({result['throughput']['rows_per_second']:.1f} rows/s) with "
                f"{len(embedder.batch_shapes)} compiled batch shape(s) on {mesh.size} device(s)")
  return result, tables
