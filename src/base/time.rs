//! Calendar dates from epoch seconds without a date crate: FAT timestamps and `faketime`'s
//! argument both need the civil date of `SOURCE_DATE_EPOCH`.

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for `epoch`, the form `faketime` takes.
pub fn civil_time(epoch: u64) -> String {
    let (y, m, d) = civil((epoch / 86_400) as i64);
    let s = epoch % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_time_of_a_billion() {
        assert_eq!(super::civil_time(1_000_000_000), "2001-09-09 01:46:40");
        assert_eq!(super::civil(0), (1970, 1, 1));
    }
}
