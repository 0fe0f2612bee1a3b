"""bench/reliability.py, the script that writes the README's reliability table: the README holds its
markers and one row per campaign a plain run makes; a failed campaign is a row that says FAILED;
--readme replaces the table and nothing else; and a real (small) campaign's row comes from what
the campaign reported."""

from __future__ import annotations

import os
import tempfile
import unittest
from unittest import mock

from bench import reliability
from bench.reliability import BEGIN, END, Row

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ReadmeTableTest(unittest.TestCase):
    def test_the_readme_table_is_the_scripts_output_with_a_row_per_campaign(self) -> None:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
        self.assertEqual((text.count(BEGIN), text.count(END)), (1, 1))
        table = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
        recorded = reliability.load_record()
        self.assertEqual(table, reliability.markdown(recorded), "README.md's table is not bench/reliability.json's")
        self.assertIn("Made by `python3 -m bench reliability", table)
        self.assertTrue(set(reliability.DEFAULT) <= {r.name for r in recorded}, table)
        self.assertFalse([r for r in recorded if not r.ok or "FAILED" in r.lost], table)

    def test_write_readme_replaces_only_the_table(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "README.md")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"# before\n\n{BEGIN}\nold table\n{END}\n\n## after\n")
            rows = [Row("kill -9", "3 kills", "0 bytes lost", True, 1.0, "crash-ours", "python3 -m bench x")]
            reliability.write_readme(reliability.markdown(rows), path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
        self.assertTrue(text.startswith("# before\n\n" + BEGIN))
        self.assertTrue(text.endswith(END + "\n\n## after\n"))
        self.assertNotIn("old table", text)
        self.assertIn("| kill -9 | 3 kills | 0 bytes lost |", text)

    def test_a_readme_without_markers_is_refused(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "README.md")
            with open(path, "w", encoding="utf-8") as f:
                f.write("# no table here\n")
            with self.assertRaises(SystemExit):
                reliability.write_readme("table", path)


    def test_recording_one_campaign_keeps_the_others(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "reliability.json")
            reliability.record([Row("a", "1", "none", True, 1.0, "fuzz", "run 1"),
                                Row("b", "2", "none", True, 1.0, "reconnect", "run 1")], path)
            rows = reliability.record([Row("c", "3", "none", True, 1.0, "fuzz", "run 2")], path)
        self.assertEqual([(r.campaign, r.made) for r in rows], [("c", "run 2"), ("b", "run 1")])


class CampaignRowTest(unittest.TestCase):
    def test_a_campaign_that_dies_is_a_failed_row(self) -> None:
        with mock.patch.object(reliability, "_bench", return_value=(None, "Traceback ...\nOSError: boom\n", 2.0)):
            (row,) = reliability.reconnect(1.0)
        self.assertFalse(row.ok)
        self.assertEqual(row.lost, "FAILED: OSError: boom")

    def test_lost_bytes_make_a_crash_row_fail(self) -> None:
        campaign = {"frontend": "ours", "backend": "ours", "ring": "split", "kills": 5, "in_flight_at_kill": 2,
                    "writes": 100, "lost_bytes": 4096, "hangs": 0, "errors": 0, "order_violations": 0,
                    "seconds": 3.0}
        with mock.patch.object(reliability, "_bench", return_value=({"campaigns": [campaign]}, "", 3.0)):
            (row,) = reliability.crash_ours(0.1)
        self.assertFalse(row.ok)
        self.assertIn("4096 bytes lost", row.lost)

    def test_bad_input_campaign_runs_its_tests(self) -> None:
        (row,) = reliability.CAMPAIGNS["bad-input"](1.0)
        self.assertTrue(row.ok, row)
        self.assertRegex(row.tried, r"\(([1-9]\d*) tests: test_backend_bad_input\)")


if __name__ == "__main__":
    unittest.main()
