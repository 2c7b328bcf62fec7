"""Records made from shared columns (an ensemble's members) read, count, pickle and store as plain rows."""

import math
import pickle

from gradwatch.records import Records, Run

STEPS, EPOCHS = [0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1]
LAYERS, STATS = ["dense1", "out"] * 3, ["grad_norm"] * 6


def _plain(rows) -> list[tuple]:
    """Rows with NaN as None, so that equal rows compare equal."""
    return [(*r[:4], None if math.isnan(r[4]) else r[4]) for r in rows]


def _zipped(values: list[float], stop: int = 6, keep: list[bool] | None = None) -> Records:
    return Records.zipped((STEPS, EPOCHS, LAYERS, STATS, values), stop, keep)


def test_zipped_records_are_the_rows_of_their_columns_up_to_stop_and_kept():
    values = [0.5, 1.0, 0.25, 1.0, math.nan, 1.0]
    rows = list(zip(STEPS, EPOCHS, LAYERS, STATS, values, strict=True))
    keep = [True, True, False, False, True, True]
    cases = [(_zipped(values), rows), (_zipped(values, 4), rows[:4]),
             (_zipped(values, 5, keep), [rows[0], rows[1], rows[4]])]
    for records, expected in cases:
        assert len(records) == len(expected)  # counted from the columns
        assert _plain(records) == _plain(expected)  # iterated from the columns
        assert _plain(records.rows) == _plain(expected) and len(records) == len(expected)  # made once
        assert _plain(records) == _plain(expected)  # iterated from the rows made
    later = _zipped(values, 2)
    later.add(3, 2, "loss", {"": 0.7})  # appended after the columns' rows
    assert list(later.rows) == [*rows[:2], (3, 2, "", "loss", 0.7)] and len(later) == 3
    assert later.at("grad_norm") == {"dense1": 0.5, "out": 1.0}


def test_members_sharing_columns_pickle_them_once_and_store_whole(tmp_store):
    members = [_zipped([float(e + i) for i in range(6)]) for e in range(2)]
    alone = len(pickle.dumps(members[:1]))
    together = len(pickle.dumps(members))
    assert together < 1.5 * alone  # the shared step/epoch/layer/stat columns once, not per member
    back = pickle.loads(pickle.dumps(members))
    assert [list(b.rows) for b in back] == [list(m.rows) for m in members]
    run = Run(records=_zipped([0.5, 1.0, 0.25, 1.0, math.nan, 1.0], 5), name="zipped")
    tmp_store.put_run(run)
    stored = tmp_store.get("zipped").records.rows
    assert _plain(stored) == _plain(run.records.rows) and len(stored) == 5
