"""report: pictures and pages drawn from Runs (Records in, matplotlib Figures and HTML out).

``figures.FIGURES`` holds one function per picture, ``captions.CAPTIONS`` the paragraph under each,
``html`` assembles self-contained pages, and ``show(run)`` draws a run inline in a notebook.
"""

from gradwatch.report.html import show, write_demo_report, write_report

__all__ = ["show", "write_demo_report", "write_report"]
