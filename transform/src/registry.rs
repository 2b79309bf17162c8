//! The device registry: what the fleet inventory knows about each device, joined onto every
//! accepted reading (the `site`, `model`, `firmware`, `lat` and `lon` columns).
//!
//! Loaded once at start-up from a CSV file with the header
//! `device_id,site,model,firmware,lat,lon,installed_at` (columns in any order, all required,
//! no others). Empty cells are null. Device ids follow the same rule as in payloads
//! ([`is_valid_device_id`]), so every registry row can match a reading.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sensorlake_core::time::parse_rfc3339;

/// Whether `id` is a valid device id: 1–64 characters of `A-Z a-z 0-9 _ . : -`, and neither
/// `.` nor `..` (device ids end up next to paths, e.g. in partition keys and object names).
///
/// ```
/// use sensorlake_transform::is_valid_device_id;
/// assert!(is_valid_device_id("env-000042"));
/// assert!(is_valid_device_id("site.a:pump_7"));
/// assert!(!is_valid_device_id(".."));
/// assert!(!is_valid_device_id("a/b"));
/// ```
pub fn is_valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        && id != "."
        && id != ".."
}

/// What the registry knows about one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceInfo {
    /// Where the device is installed.
    pub site: Option<String>,
    /// Hardware model.
    pub model: Option<String>,
    /// Firmware version.
    pub firmware: Option<String>,
    /// Latitude in degrees (−90 … 90).
    pub lat: Option<f64>,
    /// Longitude in degrees (−180 … 180).
    pub lon: Option<f64>,
    /// When the device was installed, µs since the epoch (not written to telemetry rows).
    pub installed_at_us: Option<i64>,
}

/// Device id → [`DeviceInfo`].
#[derive(Debug, Clone, Default)]
pub struct Registry {
    devices: foldhash::HashMap<Box<str>, DeviceInfo>,
}

/// Why a registry file could not be loaded. Every variant names the file (`<reader>` when read
/// from a reader) and, once reading has started, the line; the operator fixes the file.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be opened.
    #[error("failed to open device registry {file}")]
    Open {
        /// The file.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CSV could not be read: an I/O error, invalid UTF-8, or a row with the wrong number
    /// of fields.
    #[error("failed to read device registry {file} at line {line}")]
    Csv {
        /// The file.
        file: String,
        /// The line of the offending row, or where reading stopped.
        line: u64,
        /// The CSV error.
        #[source]
        source: csv::Error,
    },
    /// The header is missing a column, repeats one or has an unknown one.
    #[error(
        "device registry {file} line 1: expected the header `device_id,site,model,firmware,lat,lon,installed_at` (any order), found `{found}`"
    )]
    Header {
        /// The file.
        file: String,
        /// The header as found.
        found: String,
    },
    /// A device id breaks the rule of [`is_valid_device_id`].
    #[error(
        "device registry {file} line {line}: device_id `{device_id}` is not 1-64 characters of A-Z a-z 0-9 _ . : -"
    )]
    InvalidDeviceId {
        /// The file.
        file: String,
        /// The line.
        line: u64,
        /// The id as found.
        device_id: String,
    },
    /// A device is listed twice.
    #[error("device registry {file} line {line}: device `{device_id}` is already listed")]
    DuplicateDevice {
        /// The file.
        file: String,
        /// The line of the second listing.
        line: u64,
        /// The device.
        device_id: String,
    },
    /// `lat` or `lon` is not a number in its range.
    #[error("device registry {file} line {line}: {column} `{value}` is not a number in {range}")]
    InvalidCoordinate {
        /// The file.
        file: String,
        /// The line.
        line: u64,
        /// `lat` or `lon`.
        column: &'static str,
        /// The value as found.
        value: String,
        /// The valid range.
        range: &'static str,
    },
    /// `installed_at` is neither RFC 3339 nor a date.
    #[error(
        "device registry {file} line {line}: installed_at `{value}` is neither an RFC 3339 time nor a YYYY-MM-DD date"
    )]
    InvalidInstalledAt {
        /// The file.
        file: String,
        /// The line.
        line: u64,
        /// The value as found.
        value: String,
    },
}

const COLUMNS: [&str; 7] = [
    "device_id",
    "site",
    "model",
    "firmware",
    "lat",
    "lon",
    "installed_at",
];

impl Registry {
    /// A registry that knows no device: every reading gets null registry columns (or is
    /// rejected, with `unknown_devices = "reject"`).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads a registry CSV file.
    ///
    /// # Errors
    /// When the file cannot be opened or read, or a row breaks a rule; the error names the
    /// file and the line.
    pub fn from_csv_path(path: &Path) -> Result<Self, RegistryError> {
        let file = path.display().to_string();
        let reader = File::open(path).map_err(|source| RegistryError::Open {
            file: file.clone(),
            source,
        })?;
        Self::read(reader, file)
    }

    /// Loads a registry CSV from a reader (errors name the file `<reader>`).
    ///
    /// ```
    /// use sensorlake_transform::Registry;
    /// let csv = "device_id,site,model,firmware,lat,lon,installed_at\n\
    ///            env-000042,plant-a,EM-3,1.4.2,52.52,13.40,2026-01-15\n";
    /// let registry = Registry::from_csv_reader(csv.as_bytes()).unwrap();
    /// assert_eq!(registry.get("env-000042").unwrap().site.as_deref(), Some("plant-a"));
    /// ```
    ///
    /// # Errors
    /// As [`Registry::from_csv_path`].
    pub fn from_csv_reader<R: Read>(reader: R) -> Result<Self, RegistryError> {
        Self::read(reader, "<reader>".to_owned())
    }

    fn read<R: Read>(reader: R, file: String) -> Result<Self, RegistryError> {
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        let csv_error = |file: &str, source: csv::Error, line: u64| RegistryError::Csv {
            file: file.to_owned(),
            line: source.position().map_or(line, |p| p.line()),
            source,
        };
        let header = csv.headers().map_err(|e| csv_error(&file, e, 1))?.clone();
        // For each of COLUMNS, its index in the file.
        let mut index = [None; COLUMNS.len()];
        let mut header_ok = header.len() == COLUMNS.len();
        for (i, name) in header.iter().enumerate() {
            match COLUMNS.iter().position(|c| *c == name) {
                Some(c) if index[c].is_none() => index[c] = Some(i),
                _ => header_ok = false, // unknown or repeated
            }
        }
        let [i_id, i_site, i_model, i_firmware, i_lat, i_lon, i_installed] = match index {
            [
                Some(a),
                Some(b),
                Some(c),
                Some(d),
                Some(e),
                Some(f),
                Some(g),
            ] if header_ok => [a, b, c, d, e, f, g],
            _ => {
                return Err(RegistryError::Header {
                    file,
                    found: header.iter().collect::<Vec<_>>().join(","),
                });
            }
        };

        let mut devices = foldhash::HashMap::default();
        let mut last_line = 1;
        for row in csv.records() {
            let row = row.map_err(|e| csv_error(&file, e, last_line + 1))?;
            let line = row.position().map_or(last_line + 1, |p| p.line());
            last_line = line;
            let cell = |i: usize| row.get(i).filter(|s| !s.is_empty());
            let text = |i: usize| cell(i).map(str::to_owned);
            let device_id = row.get(i_id).unwrap_or_default();
            if !is_valid_device_id(device_id) {
                return Err(RegistryError::InvalidDeviceId {
                    file,
                    line,
                    device_id: device_id.to_owned(),
                });
            }
            let coordinate = |i: usize, column: &'static str, limit: f64, range: &'static str| {
                cell(i)
                    .map(|s| match s.parse::<f64>() {
                        Ok(v) if v.is_finite() && (-limit..=limit).contains(&v) => Ok(v),
                        _ => Err(RegistryError::InvalidCoordinate {
                            file: file.clone(),
                            line,
                            column,
                            value: s.to_owned(),
                            range,
                        }),
                    })
                    .transpose()
            };
            let lat = coordinate(i_lat, "lat", 90.0, "-90..=90")?;
            let lon = coordinate(i_lon, "lon", 180.0, "-180..=180")?;
            let installed_at_us = cell(i_installed)
                .map(|s| {
                    parse_installed_at(s).ok_or_else(|| RegistryError::InvalidInstalledAt {
                        file: file.clone(),
                        line,
                        value: s.to_owned(),
                    })
                })
                .transpose()?;
            let info = DeviceInfo {
                site: text(i_site),
                model: text(i_model),
                firmware: text(i_firmware),
                lat,
                lon,
                installed_at_us,
            };
            if devices.insert(device_id.into(), info).is_some() {
                return Err(RegistryError::DuplicateDevice {
                    file,
                    line,
                    device_id: device_id.to_owned(),
                });
            }
        }
        Ok(Self { devices })
    }

    /// What the registry knows about a device.
    pub fn get(&self, device_id: &str) -> Option<&DeviceInfo> {
        self.devices.get(device_id)
    }

    /// How many devices the registry lists.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether the registry lists no device.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

/// RFC 3339, or a plain date taken as midnight UTC.
fn parse_installed_at(s: &str) -> Option<i64> {
    if s.len() == 10 {
        parse_rfc3339(&format!("{s}T00:00:00Z"))
    } else {
        parse_rfc3339(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "device_id,site,model,firmware,lat,lon,installed_at\n";

    fn load(body: &str) -> Result<Registry, RegistryError> {
        Registry::from_csv_reader(format!("{HEADER}{body}").as_bytes())
    }

    #[test]
    fn device_ids_follow_the_payload_rule() {
        assert!(is_valid_device_id("A-z_0.9:x"));
        assert!(is_valid_device_id(&"a".repeat(64)));
        assert!(is_valid_device_id("..."));
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(65), "a\0"] {
            assert!(!is_valid_device_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn loads_rows_with_empty_cells_as_null() {
        let r = load(
            "env-1,plant-a,EM-3,1.4.2,52.5,13.4,2026-01-15\n\
             env-2,,,,,,\n\
             env-3, plant-b ,M,2,-90,180,2026-01-15T10:00:00Z\n",
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert!(!r.is_empty());
        let e1 = r.get("env-1").unwrap();
        assert_eq!(e1.site.as_deref(), Some("plant-a"));
        assert_eq!(e1.lat, Some(52.5));
        assert_eq!(e1.installed_at_us, parse_rfc3339("2026-01-15T00:00:00Z"));
        assert_eq!(r.get("env-2").unwrap(), &DeviceInfo::default());
        assert_eq!(r.get("env-3").unwrap().site.as_deref(), Some("plant-b"));
        assert!(r.get("env-4").is_none());
    }

    #[test]
    fn accepts_columns_in_any_order_and_a_byte_order_mark() {
        let csv =
            "\u{feff}site,device_id,lat,lon,model,firmware,installed_at\nplant-a,env-1,,,,,\n";
        let r = Registry::from_csv_reader(csv.as_bytes()).unwrap();
        assert_eq!(r.get("env-1").unwrap().site.as_deref(), Some("plant-a"));
    }

    #[test]
    fn empty_registry_knows_no_device() {
        assert!(Registry::empty().is_empty());
        assert!(load("").unwrap().is_empty());
    }

    #[test]
    fn rejects_a_wrong_header() {
        for header in [
            "device_id,site,model,firmware,lat,lon\n",
            "device_id,site,model,firmware,lat,lon,installed_at,extra\n",
            "device_id,site,site,firmware,lat,lon,installed_at\n",
        ] {
            let err = Registry::from_csv_reader(header.as_bytes()).unwrap_err();
            assert!(matches!(err, RegistryError::Header { .. }), "{err}");
            assert!(err.to_string().contains("<reader> line 1"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_line_of_the_bad_row() {
        let cases = [
            ("env-1,,,,,,\nenv/2,,,,,,\n", 3, "device_id `env/2`"),
            ("env-1,,,,,,\nenv-1,,,,,,\n", 3, "already listed"),
            ("env-1,,,,91,,\n", 2, "lat `91`"),
            ("env-1,,,,,east,\n", 2, "lon `east`"),
            ("env-1,,,,,,yesterday\n", 2, "installed_at `yesterday`"),
            ("env-1,,,,,,\nenv-2,,\n", 3, "failed to read"),
        ];
        for (body, line, text) in cases {
            let err = load(body).unwrap_err().to_string();
            assert!(err.contains(&format!("line {line}")), "{err}");
            assert!(err.contains(text), "{err}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.csv");
        let err = Registry::from_csv_path(&path).unwrap_err();
        assert!(matches!(err, RegistryError::Open { .. }));
        assert!(err.to_string().contains("devices.csv"), "{err}");

        std::fs::write(&path, format!("{HEADER}env-1,,,,,,\nbad id,,,,,,\n")).unwrap();
        let err = Registry::from_csv_path(&path).unwrap_err().to_string();
        assert!(err.contains("devices.csv line 3"), "{err}");

        std::fs::write(&path, format!("{HEADER}env-1,a,b,c,1,2,\n")).unwrap();
        assert_eq!(Registry::from_csv_path(&path).unwrap().len(), 1);
    }
}
