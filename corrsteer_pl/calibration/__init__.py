"""Calibration: SAEs trained on calibration prompts (where none are given), recorded answers, features captured at
generation positions, streaming statistics, rankings and significance."""
