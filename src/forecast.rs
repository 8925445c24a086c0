//! The free-space forecast: a least-squares line through recent samples of a
//! filesystem's free bytes, and the time until its pessimistic bound crosses
//! a mark.
//!
//! The bound takes the fitted slope minus a one-sided Student t quantile times
//! the slope's standard error, so a noisy series forecasts an earlier
//! crossing than a steady one with the same mean rate. Everything here is
//! pure: samples and marks come in, a [`Forecast`] comes out.

use statrs::distribution::{ContinuousCDF, StudentsT};
use statrs::statistics::Statistics;

/// Confidence of the pessimistic slope bound, one-sided.
pub const CONFIDENCE: f64 = 0.95;

/// Minimum samples for a forecast: a line and one degree of freedom.
pub const MIN_SAMPLES: usize = 3;

/// One reading of a filesystem's free bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeSample {
    /// Seconds on a monotonic clock.
    pub seconds: f64,
    pub free_bytes: f64,
}

/// When free space is expected to reach a mark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Seconds from the last sample until the pessimistic bound reaches the
    /// mark; 0 when the free space is at or below the mark already.
    pub seconds_to_mark: f64,
    /// The pessimistic fill rate, in bytes per hour (positive while filling).
    pub fill_bytes_per_hour: f64,
    /// The fitted fill rate without the bound, in bytes per hour.
    pub fitted_bytes_per_hour: f64,
}

/// Forecasts when `samples` reach `mark_bytes` of free space. Returns `None`
/// when there are fewer than [`MIN_SAMPLES`] samples, when they all share one
/// time, or when the pessimistic bound of the trend does not fall.
pub fn crossing(samples: &[FreeSample], mark_bytes: f64) -> Option<Forecast> {
    let count = samples.len();
    if count < MIN_SAMPLES {
        return None;
    }
    let times: Vec<f64> = samples.iter().map(|sample| sample.seconds).collect();
    let frees: Vec<f64> = samples.iter().map(|sample| sample.free_bytes).collect();

    let time_variance = times.iter().variance();
    if time_variance.is_nan() || time_variance <= 0.0 {
        return None;
    }
    let slope = times.iter().covariance(frees.iter()) / time_variance;
    let intercept = frees.iter().mean() - slope * times.iter().mean();

    // Standard error of the slope: residual variance over the spread of the
    // sample times, with n - 2 degrees of freedom.
    let freedom = (count - 2) as f64;
    let residual_squares: f64 = times.iter().zip(&frees).map(|(time, free)| (free - (intercept + slope * time)).powi(2)).sum();
    let time_squares = time_variance * (count - 1) as f64;
    let slope_error = (residual_squares / freedom / time_squares).sqrt();

    let quantile = StudentsT::new(0.0, 1.0, freedom).expect("freedom is at least 1, and location 0 and scale 1 are valid").inverse_cdf(CONFIDENCE);
    let pessimistic_slope = slope - quantile * slope_error;
    if pessimistic_slope.is_nan() || pessimistic_slope >= 0.0 {
        return None;
    }

    let last = samples[count - 1];
    let fitted_now = intercept + slope * last.seconds;
    let level = fitted_now.min(last.free_bytes);
    let seconds_to_mark = ((level - mark_bytes) / -pessimistic_slope).max(0.0);
    Some(Forecast { seconds_to_mark, fill_bytes_per_hour: -pessimistic_slope * 3600.0, fitted_bytes_per_hour: -slope * 3600.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

    /// Samples every five minutes for two hours, filling at `rate` GiB per
    /// hour from 50 GiB free, with `noise(index)` GiB added to each.
    fn series(rate: f64, noise: impl Fn(usize) -> f64) -> Vec<FreeSample> {
        (0..=24)
            .map(|index| {
                let seconds = index as f64 * 300.0;
                FreeSample { seconds, free_bytes: (50.0 - rate * seconds / 3600.0 + noise(index)) * GIB }
            })
            .collect()
    }

    /// Returns the mark 10 GiB below the last sample of a steady 1 GiB/h series.
    fn mark() -> f64 {
        (50.0 - 2.0 - 10.0) * GIB
    }

    #[test]
    fn steady_fill_crosses_in_ten_hours() {
        let forecast = crossing(&series(1.0, |_| 0.0), mark()).expect("a falling series has a forecast");

        let hours = forecast.seconds_to_mark / 3600.0;
        assert!((hours - 10.0).abs() <= 0.5, "{hours} h");
        assert!((forecast.fill_bytes_per_hour / GIB - 1.0).abs() < 1e-6, "{forecast:?}");
    }

    #[test]
    fn noisy_fill_crosses_no_later_than_steady() {
        // Deterministic noise of ±0.3 GiB that averages out over the series.
        let noise = |index: usize| [0.3, -0.2, 0.1, -0.3, 0.2, -0.1][index % 6];
        let steady = crossing(&series(1.0, |_| 0.0), mark()).unwrap();

        let noisy = crossing(&series(1.0, noise), mark()).expect("a noisy falling series has a forecast");

        assert!(noisy.seconds_to_mark <= steady.seconds_to_mark, "noisy {noisy:?}, steady {steady:?}");
        assert!(noisy.fill_bytes_per_hour > noisy.fitted_bytes_per_hour, "the bound is steeper than the fit: {noisy:?}");
    }

    #[test]
    fn flat_series_has_no_forecast() {
        assert_eq!(crossing(&series(0.0, |_| 0.0), mark()), None);
    }

    #[test]
    fn rising_series_has_no_forecast() {
        assert_eq!(crossing(&series(-1.0, |_| 0.0), mark()), None);
    }

    #[test]
    fn noisy_flat_series_bound_falls_slowly() {
        let noise = |index: usize| [0.3, -0.2, 0.1, -0.3, 0.2, -0.1][index % 6];

        let forecast = crossing(&series(0.0, noise), mark());

        let hours = forecast.map_or(f64::INFINITY, |forecast| forecast.seconds_to_mark / 3600.0);
        assert!(hours > 100.0, "noise alone forecasts no crossing within days: {forecast:?}");
    }

    #[test]
    fn too_few_samples_have_no_forecast() {
        let samples = &series(1.0, |_| 0.0)[..2];
        assert_eq!(crossing(samples, mark()), None);
    }

    #[test]
    fn level_below_mark_crosses_now() {
        let forecast = crossing(&series(1.0, |_| 0.0), 49.0 * GIB).unwrap();
        assert_eq!(forecast.seconds_to_mark, 0.0);
    }
}
