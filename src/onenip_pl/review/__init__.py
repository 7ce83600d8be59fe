"""The review report: report.html with a row per test or predicted image, its pictures and decisions."""

from onenip_pl.review.collect import RunRows
from onenip_pl.review.page import PAGE_NAME, write_review_page
from onenip_pl.review.rows import ReviewRow, outcome_counts

__all__ = ["PAGE_NAME", "ReviewRow", "RunRows", "outcome_counts", "write_review_page"]
