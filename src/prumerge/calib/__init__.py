"""Calibration: image sets, token-budget statistics (the padded capacity), INT8 vision graphs with the reducer exact."""

from .budget import BudgetReport, calibrate_budget, capacity_for_coverage
from .images import CalibrationSet

__all__ = ["BudgetReport", "CalibrationSet", "calibrate_budget", "capacity_for_coverage"]
