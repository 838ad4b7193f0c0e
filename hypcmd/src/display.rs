//! `Display` of a [`Command`]: the command back in the console syntax, so
//! that `parse(&cmd.to_string()) == Ok(Some(cmd))` (the parser's round trip
//! the fuzz test checks).

use crate::command::*;
use core::fmt;

/// Prints ` <batch>` when one was typed.
struct Batch(Option<usize>);

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) => write!(f, " {b}"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Command::*;
        match self {
            Help => f.write_str("help"),
            Vms => f.write_str("vms"),
            Stats => f.write_str("stats"),
            Pause(vm) => write!(f, "pause {vm}"),
            Resume(vm) => write!(f, "resume {vm}"),
            Destroy(vm) => write!(f, "destroy {vm}"),
            Fork { vm, count } => write!(f, "fork {vm} {count}"),
            Snapshot { vm, count } => write!(f, "snapshot {vm} {count}"),
            Restore { vm, snapshot } => write!(f, "restore {vm} {snapshot}"),
            Rmap { pa } => write!(f, "rmap {pa:#x}"),
            Migrate { vm, range, batch } => write!(f, "migrate {vm} {range}{}", Batch(*batch)),
            Evacuate { range, batch } => write!(f, "evacuate {range}{}", Batch(*batch)),
            Online { range } => write!(f, "online {range}"),
            Reclaim { pages, batch } => write!(f, "reclaim {pages}{}", Batch(*batch)),
            Chaos {
                secs,
                seed,
                max_vms,
            } => write!(f, "chaos {secs} {seed} {max_vms}"),
            Wait { secs } => write!(f, "wait {secs}"),
            BenchFork { mib, forks: None } => write!(f, "bench fork {mib}"),
            BenchFork {
                mib,
                forks: Some(n),
            } => write!(f, "bench fork {mib} {n}"),
            BenchMigrate {
                mappers,
                pages,
                batch,
                blocks,
            } => {
                write!(f, "bench migrate {mappers} {pages} {batch}")?;
                if *blocks {
                    f.write_str(" blocks")?;
                }
                Ok(())
            }
            BenchReclaim { pages, batch } => write!(f, "bench reclaim {pages} {batch}"),
            BenchMerge { pages } => write!(f, "bench merge {pages}"),
            Sleep { ms } => write!(f, "sleep {ms}"),
            Quit => f.write_str("quit"),
            Console(to) => write!(f, "console {to}"),
            Disk => f.write_str("disk"),
            DiskSum { lba, sectors } => write!(f, "disk sum {lba} {sectors}"),
            DiskFill { lba, sectors, seed } => write!(f, "disk fill {lba} {sectors} {seed}"),
            BenchDisk { mib, passes, at } => {
                write!(f, "bench disk {mib} {passes}")?;
                match at {
                    Some(lba) => write!(f, " at {lba}"),
                    None => Ok(()),
                }
            }
            Create(c) => write!(f, "{c}"),
            MergeGroup { vm, group } => write!(f, "merge group {vm} {group}"),
            Merge => f.write_str("merge"),
            MergeAuto { rate } => write!(f, "merge auto {rate}"),
            MergeOff => f.write_str("merge off"),
            MergeList { count } => write!(f, "merge list {count}"),
            Save { vm, name, parent } => {
                write!(f, "save {vm} {name}")?;
                match parent {
                    Some(p) => write!(f, " --diff {p}"),
                    None => Ok(()),
                }
            }
            Images => f.write_str("images"),
            Delete { name } => write!(f, "delete {name}"),
            Load { name, prefetch } => {
                write!(
                    f,
                    "load {name}{}",
                    if *prefetch { "" } else { " --no-prefetch" }
                )
            }
        }
    }
}
