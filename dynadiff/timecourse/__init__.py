"""Time-resolved decoding behind ``timecourse.py``: the same test images decoded from windows that slide over time.

For each offset ``k`` (in TRs from the trial's onset volume ``t``), every test image is decoded from the window
``[t + k, t + k + n)`` of the model's own length ``n`` (6 TRs for the published checkpoints, whose window is
``[t + 3, t + 9)``: eval.py's), by the same checkpoint. Then each offset is measured like eval.py measures its
run, with a bootstrap interval over images.

- **Data**: each run is loaded and cleaned once for the whole sweep (:class:`~dynadiff.config.RunSeriesConfig`
  caches the cleaned runs); every offset's windows are cut from them.
- **Test set**: eval.py's samples, in its order (one repetition per image chosen as eval.py does, or the mean of
  all repetitions with ``--averaged-trial``). A repetition whose window would run past the start or end of its
  run is left out at that offset (an averaged image then averages the others; an image left with none is left
  out), and the outputs count what was left out: never padded.
- **Generation**: cached per (checkpoint, offset, image) by exca
  (:class:`~dynadiff.config.SweepGenerationConfig`): a killed sweep resumes with the missing images only, and
  runs as job arrays on a cluster like eval.py's generation.
- **Outputs** in ``{cache}/timecourse_subjXX_{averaged|unaveraged}_{run id}/`` (``timecourse_subjXX_{mode}`` links
  to the latest): ``timecourse.json`` (written last) and ``.csv``, ``timecourse.png``, ``filmstrip.png`` and
  ``strips/{i}.png`` (the ground truth, then the reconstruction at each offset).


The package: :mod:`.offsets` (where windows start), :mod:`.sweep_data` (the windows and their generation),
:mod:`.stats` (bootstrap intervals, peaks), :mod:`.sweep` (the run), :mod:`.figures` (tables and pictures).
"""

from dynadiff.timecourse.figures import STRIP_TILE, csv_table, filmstrip, plot_generalization, plot_timecourse, strip
from dynadiff.timecourse.offsets import (
    DEFAULT_OFFSETS,
    ModelWindow,
    TimecourseError,
    model_window,
    offsets_from_seconds,
    parse_offsets,
)
from dynadiff.timecourse.stats import N_BOOTSTRAP, bootstrap_interval, peak
from dynadiff.timecourse.sweep import SweepModel, check_decoders, output_dir, point_latest_link, run_timecourse
from dynadiff.timecourse.sweep_data import (
    OffsetPlan,
    SweepData,
    generate_sweep_images,
    generation_config,
    item_name,
    plan,
)

__all__ = [
    "DEFAULT_OFFSETS", "N_BOOTSTRAP", "STRIP_TILE", "ModelWindow", "OffsetPlan", "SweepData", "SweepModel",
    "TimecourseError", "bootstrap_interval", "check_decoders", "csv_table", "filmstrip", "generate_sweep_images",
    "generation_config", "item_name", "model_window", "offsets_from_seconds", "output_dir", "parse_offsets", "peak",
    "plan", "plot_generalization", "plot_timecourse", "point_latest_link", "run_timecourse", "strip",
]
