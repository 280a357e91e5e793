"""Reports: a self-contained HTML page (tables + plots) for a compression run."""

from slimguard.report.html import render_html, write_report

__all__ = ["render_html", "write_report"]
