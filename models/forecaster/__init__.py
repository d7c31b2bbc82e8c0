"""Per-guest CPU and memory demand forecaster (a small Transformer, quantile outputs).

Entry point: `Forecaster.load().predict(history, next_time_s)` -> `Forecast`.
"""

from models.forecaster.model import Forecast, ForecastConfig, Forecaster

__all__ = ["Forecast", "ForecastConfig", "Forecaster"]
