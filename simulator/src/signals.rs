//! Plausible sensor signals for the three default device types.
//!
//! Each device carries a little state (a baseline, a load scale, a slow random-walk drift, its
//! energy counter) and produces one set of metric values per reading from the reading's event
//! time: a daily cycle in the device's local solar time, gaussian noise, occasional spikes.
//! Values are rounded to 2–3 decimals, so that their shortest decimal form parses back to the
//! very same `f64` (the fingerprint of a reading survives the JSON round trip), and are always
//! inside the valid ranges of [`DeviceTypeSpec::defaults`](sensorlake_core::DeviceTypeSpec::defaults).
//!
//! The number of random draws per reading never depends on the event time, so two runs with
//! the same seed make the same choices even when their clocks differ.

use crate::rng::Rng;

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;
/// Milliseconds in an hour.
const HOUR_MS: f64 = 3_600_000.0;
/// Integrating energy over a gap longer than this would fake a huge jump after a pause.
const MAX_INTEGRATION_MS: i64 = 3_600_000;

/// The three model families, in the order of `DeviceTypeSpec::defaults()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Model {
    /// `env`: temperature_c, humidity_pct, battery_v.
    Env,
    /// `vibration`: rms_mm_s, peak_g, temperature_c.
    Vibration,
    /// `power`: voltage_v, current_a, power_w, energy_kwh.
    Power,
}

impl Model {
    /// The model of a default device type index.
    pub(crate) fn of_type_index(ty: usize) -> Self {
        match ty {
            0 => Model::Env,
            1 => Model::Vibration,
            _ => Model::Power,
        }
    }
}

/// Per-device signal state.
#[derive(Debug, Clone)]
pub(crate) struct SignalState {
    model: Model,
    /// Longitude, for local solar time.
    lon: f64,
    /// A per-device offset of the main signal.
    base: f64,
    /// A per-device load scale.
    scale: f64,
    /// Slow random walk added to the main signal.
    drift: f64,
    /// Battery voltage (env) or nominal grid voltage (power).
    volts: f64,
    /// Power factor (power).
    power_factor: f64,
    /// Exact energy counter (power); emitted rounded to 3 decimals, so it never goes down.
    energy_kwh: f64,
    /// Event time of the previous reading, to integrate power.
    last_ts_ms: Option<i64>,
}

impl SignalState {
    /// A new device of `model` at longitude `lon`, with its character drawn from `rng`.
    pub(crate) fn new(model: Model, lon: f64, rng: &mut Rng) -> Self {
        let (base, scale, volts) = match model {
            Model::Env => (rng.range(-4.0, 4.0), 1.0, rng.range(3.6, 4.2)),
            Model::Vibration => (rng.range(-5.0, 5.0), rng.range(1.0, 8.0), 0.0),
            Model::Power => {
                let nominal = [230.0, 230.0, 120.0, 400.0][rng.below(4)];
                (0.0, rng.range(2.0, 80.0), nominal)
            }
        };
        Self {
            model,
            lon,
            base,
            scale,
            drift: 0.0,
            volts,
            power_factor: rng.range(0.92, 0.99),
            energy_kwh: round_to(rng.range(10.0, 5_000.0), 3),
            last_ts_ms: None,
        }
    }

    /// The metric values of a reading at `ts_ms`, in the device type's metric order.
    ///
    /// Advances the drift and (for power devices) the energy counter.
    pub(crate) fn sample(&mut self, ts_ms: i64, rng: &mut Rng) -> Vec<f64> {
        // Draws: always the same number, whatever the time.
        let n1 = rng.gaussian();
        let n2 = rng.gaussian();
        let n3 = rng.gaussian();
        let walk = rng.gaussian();
        let spike = rng.chance(0.01);
        let spike_size = rng.range(3.0, 6.0);

        self.drift = (self.drift + 0.02 * walk) * 0.995;
        let local_hour =
            (ts_ms.rem_euclid(DAY_MS) as f64 / HOUR_MS + self.lon / 15.0).rem_euclid(24.0);
        // +1 at 15:00 local time, -1 at 03:00.
        let daily = (std::f64::consts::TAU * (local_hour - 9.0) / 24.0).sin();
        let working = if (6.0..22.0).contains(&local_hour) {
            1.0
        } else {
            0.35
        };

        let dt_ms = self
            .last_ts_ms
            .map_or(0, |last| (ts_ms - last).clamp(0, MAX_INTEGRATION_MS));
        self.last_ts_ms = Some(ts_ms);

        match self.model {
            Model::Env => {
                let spike_c = if spike { 3.0 * spike_size } else { 0.0 };
                let t = 20.0 + self.base + 5.0 * daily + self.drift + 0.3 * n1 + spike_c;
                let h = 50.0 - 2.0 * self.base - 15.0 * daily + 1.5 * n2;
                // The battery sags slowly and is swapped for a fresh one at 3.3 V.
                self.volts -= 0.000_05;
                if self.volts < 3.3 {
                    self.volts = 4.2;
                }
                let b = self.volts + 0.005 * n3;
                vec![
                    clamp_round(t, -40.0, 125.0, 2),
                    clamp_round(h, 0.0, 100.0, 2),
                    clamp_round(b, 2.0, 4.5, 3),
                ]
            }
            Model::Vibration => {
                let spike_f = if spike { spike_size } else { 1.0 };
                let rms = (self.scale * working * (1.0 + 0.1 * n1) + self.drift.abs()) * spike_f;
                let peak =
                    rms * 0.15 * (1.0 + 0.1 * n2).abs() + if spike { spike_size } else { 0.0 };
                let temp = 40.0 + self.base + 10.0 * working + 3.0 * daily + 0.5 * n3;
                vec![
                    clamp_round(rms, 0.0, 100.0, 2),
                    clamp_round(peak, 0.0, 50.0, 3),
                    clamp_round(temp, -40.0, 125.0, 2),
                ]
            }
            Model::Power => {
                let v = clamp_round(self.volts + 2.0 * n1 + self.drift, 0.0, 500.0, 2);
                let load = 0.5 + 0.5 * daily.max(0.0) * working;
                let spike_f = if spike { 2.0 } else { 1.0 };
                let a = clamp_round(
                    self.scale * load * (1.0 + 0.05 * n2) * spike_f,
                    0.0,
                    200.0,
                    2,
                );
                let pf = (self.power_factor + 0.005 * n3).clamp(0.5, 1.0);
                let w = clamp_round(v * a * pf, 0.0, 100_000.0, 2);
                self.energy_kwh += w * dt_ms as f64 / HOUR_MS / 1000.0;
                vec![v, a, w, round_to(self.energy_kwh, 3)]
            }
        }
    }

    /// The energy counter as the next reading would report it (power devices).
    #[cfg(test)]
    pub(crate) fn energy_kwh(&self) -> f64 {
        round_to(self.energy_kwh, 3)
    }
}

/// `x` rounded to `decimals` decimal places, such that its shortest decimal form is exact.
pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    let r = (x * p).round() / p;
    // Normalise -0.0, which a JSON round trip may print as "-0.0".
    if r == 0.0 { 0.0 } else { r }
}

/// `x` clamped into `[lo, hi]` and rounded; stays inside when `lo` and `hi` have at most
/// `decimals` decimals.
fn clamp_round(x: f64, lo: f64, hi: f64, decimals: i32) -> f64 {
    let x = if x.is_finite() { x } else { lo };
    round_to(x.clamp(lo, hi), decimals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorlake_core::DeviceTypeSpec;

    #[test]
    fn samples_stay_in_range_over_days_of_readings() {
        let types = DeviceTypeSpec::defaults();
        let mut rng = Rng::new(11);
        for (ty, spec) in types.iter().enumerate() {
            let mut s = SignalState::new(Model::of_type_index(ty), 12.5, &mut rng);
            let mut last_energy = f64::MIN;
            let mut ts = 1_764_255_845_123;
            for _ in 0..20_000 {
                ts += 17_000;
                let m = s.sample(ts, &mut rng);
                assert_eq!(m.len(), spec.metrics.len());
                for (v, spec) in m.iter().zip(&spec.metrics) {
                    assert!(spec.in_range(*v), "{} = {v} out of range", spec.name);
                    let text = format!("{v:?}");
                    assert_eq!(text.parse::<f64>().unwrap().to_bits(), v.to_bits());
                }
                if ty == 2 {
                    assert!(m[3] >= last_energy, "energy went down");
                    last_energy = m[3];
                }
            }
        }
    }

    #[test]
    fn energy_integrates_power_over_time() {
        let mut rng = Rng::new(5);
        let mut s = SignalState::new(Model::Power, 0.0, &mut rng);
        let start = s.sample(0, &mut rng)[3];
        for i in 1..=60 {
            s.sample(i * 60_000, &mut rng);
        }
        let end = s.energy_kwh();
        assert!(
            end > start,
            "an hour of load adds energy ({start} -> {end})"
        );
    }

    #[test]
    fn rounding_normalises_negative_zero() {
        assert_eq!(round_to(-0.0001, 2).to_bits(), 0f64.to_bits());
        assert_eq!(round_to(21.434, 2), 21.43);
    }
}
