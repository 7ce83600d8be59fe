"""Helpers shared by the entry points: instantiation from config, logging set-up, reports."""
