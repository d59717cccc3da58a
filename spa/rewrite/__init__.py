"""Apply a validated plan to a copy of the model; recalibration (PERP) as its own step."""
