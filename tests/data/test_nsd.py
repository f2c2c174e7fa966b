import numpy as np
import pytest

from dynadiff.data import nsd


@pytest.mark.parametrize(
    "subject, session, expected",
    [
        (1, 1, list(range(1, 13))),
        (1, 20, list(range(1, 13))),
        (1, 21, list(range(2, 14))),
        (1, 38, list(range(2, 14))),
        (1, 39, list(range(1, 13))),
        (5, 30, list(range(2, 14))),
        (2, 30, list(range(2, 14))),
        (2, 31, list(range(1, 13))),
        (7, 21, list(range(2, 14))),
        (7, 35, list(range(1, 13))),
    ],
)
def test_runs_of_session(subject, session, expected):
    assert nsd.runs_of_session(subject, session) == expected


def test_list_runs_orders_sessions_then_runs():
    runs = nsd.list_runs(2)
    assert len(runs) == 40 * 12
    keys = [(r.session, r.run) for r in runs]
    assert keys == sorted(keys)
    assert (21, 1) not in keys and (21, 14) not in keys and (31, 1) in keys
    assert [r.run for r in nsd.list_runs(1, sessions=[22, 3])][:13] == list(range(1, 13)) + [2]


def test_paths_follow_the_nsd_layout(tmp_path):
    run = nsd.Run(5, 3, 11)
    assert run.timeseries_path(tmp_path).relative_to(tmp_path).as_posix() == (
        "nsddata_timeseries/ppdata/subj05/func1pt8mm/timeseries/timeseries_session03_run11.nii.gz"
    )
    assert run.design_path(tmp_path).relative_to(tmp_path).as_posix() == (
        "nsddata_timeseries/ppdata/subj05/func1pt8mm/design/design_session03_run11.tsv"
    )
    assert nsd.stimulus_png(tmp_path, 1).name == "0.png"


@pytest.mark.parametrize("subject", [0, 3, 8])
def test_unknown_subject(subject):
    with pytest.raises(ValueError, match=r"unknown subject .*\[1, 2, 5, 7\]"):
        nsd.list_runs(subject)


def test_missing_files_are_listed_all_at_once(tmp_path):
    runs = nsd.list_runs(1, sessions=[1])
    with pytest.raises(nsd.NsdDataError) as err:
        nsd.check_files_exist(tmp_path, runs, 1)
    msg = str(err.value)
    assert msg.startswith("25 NSD file(s) missing")  # 12 series + 12 designs + nsdgeneral
    assert "nsdgeneral.nii.gz" in msg and "timeseries_session01_run01.nii.gz" in msg and "prepare_data.py" in msg


def test_design_parsing_and_errors(tmp_path):
    good = tmp_path / "design.tsv"
    values = np.zeros(225, dtype=int)
    values[[4, 9, 100]] = [73000, 1, 46003]
    good.write_text("".join(f"{v}\n" for v in values))
    design = nsd.load_design(good, 225)
    volumes, ids = nsd.events_of_design(design)
    assert volumes.tolist() == [4, 9, 100] and ids.tolist() == [73000, 1, 46003]
    short = tmp_path / "short.tsv"
    short.write_text("0\n" * 224)
    with pytest.raises(nsd.NsdDataError, match=r"short\.tsv has 224 rows, expected 225"):
        nsd.load_design(short, 225)
    bad = tmp_path / "bad.tsv"
    bad.write_text("0\n" * 200 + "x\n" + "0\n" * 24)
    with pytest.raises(nsd.NsdDataError, match=r"cannot read design file .*bad\.tsv"):
        nsd.load_design(bad, 225)
