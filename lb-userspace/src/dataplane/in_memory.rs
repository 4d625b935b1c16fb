//! The service maps in memory, with failure injection: the reconciler's tests run on them.
//! Built for tests only (`cfg(test)` or the `testing` feature).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use lb_common::{ServiceMeta, ServiceValue, map_names};

use crate::dataplane::maps::{BackendValue, MapsError, MapsSnapshot, ServiceMaps, SlotKey, remedy};
use crate::model::IpFamily;

/// Maps in memory, with optional failure injection for the reconciler's error paths.
#[derive(Clone, Debug, Default)]
pub struct InMemoryMaps {
    pub contents: MapsSnapshot,
    /// Number of writes to let through before every write fails; `None` never fails.
    pub fail_after_writes: Option<usize>,
    /// Every successful write, in order, for tests of write ordering.
    pub log: Vec<String>,
    /// Most entries the services map takes (as `--max-service-slots` sizes the real one).
    pub services_capacity: Option<usize>,
}

impl InMemoryMaps {
    fn write(&mut self, operation: &'static str, what: String) -> Result<(), MapsError> {
        match &mut self.fail_after_writes {
            Some(0) => return Err(MapsError::Injected { operation }),
            Some(left) => *left -= 1,
            None => {}
        }
        self.log.push(format!("{operation} {what}"));
        Ok(())
    }
}

fn slot_name(key: &SlotKey) -> String {
    format!("{}/{} slot {}", std::net::SocketAddr::new(key.ip, key.port), key.protocol, key.backend_slot)
}

impl ServiceMaps for InMemoryMaps {
    fn update_backend(&mut self, id: u32, backend: BackendValue) -> Result<(), MapsError> {
        self.write("update backend", id.to_string())?;
        self.contents.backends.insert(id, backend);
        Ok(())
    }

    fn delete_backend(&mut self, id: u32, family: IpFamily) -> Result<(), MapsError> {
        self.write("delete backend", id.to_string())?;
        // As the real maps: only the family's map loses it.
        if self.contents.backends.get(&id).is_some_and(|b| IpFamily::of(&b.ip) == family) {
            self.contents.backends.remove(&id);
        }
        Ok(())
    }

    fn update_service(&mut self, key: SlotKey, value: ServiceValue) -> Result<(), MapsError> {
        let full = self.services_capacity.is_some_and(|capacity| self.contents.services.len() >= capacity);
        if full && !self.contents.services.contains_key(&key) {
            return Err(MapsError::Full { map: map_names::SERVICES, remedy: remedy(map_names::SERVICES) });
        }
        self.write("update service", slot_name(&key))?;
        self.contents.services.insert(key, value);
        Ok(())
    }

    fn delete_service(&mut self, key: SlotKey) -> Result<(), MapsError> {
        self.write("delete service", slot_name(&key))?;
        self.contents.services.remove(&key);
        Ok(())
    }

    fn update_service_meta(&mut self, id: u32, meta: ServiceMeta) -> Result<(), MapsError> {
        self.write("update service meta", id.to_string())?;
        self.contents.service_meta.insert(id, meta);
        Ok(())
    }

    fn delete_service_meta(&mut self, id: u32) -> Result<(), MapsError> {
        self.write("delete service meta", id.to_string())?;
        self.contents.service_meta.remove(&id);
        Ok(())
    }

    fn update_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        self.write("update source range", format!("{service_id} {range}"))?;
        self.contents.source_ranges.insert((service_id, range));
        Ok(())
    }

    fn delete_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), MapsError> {
        self.write("delete source range", format!("{service_id} {range}"))?;
        self.contents.source_ranges.remove(&(service_id, range));
        Ok(())
    }

    fn create_maglev_table(&mut self, table: u32, positions: &[u32]) -> Result<(), MapsError> {
        self.write("create maglev table", format!("{table} size {}", positions.len()))?;
        self.contents.maglev.insert(table, positions.to_vec());
        Ok(())
    }

    fn write_maglev_positions(&mut self, table: u32, positions: &[(u32, u32)]) -> Result<(), MapsError> {
        self.write("write maglev positions", format!("{table} x{}", positions.len()))?;
        let Some(contents) = self.contents.maglev.get_mut(&table) else {
            return Err(MapsError::Injected { operation: "write maglev positions to a missing table" });
        };
        for (position, backend) in positions {
            contents[*position as usize] = *backend;
        }
        Ok(())
    }

    fn delete_maglev_table(&mut self, table: u32) -> Result<(), MapsError> {
        self.write("delete maglev table", table.to_string())?;
        self.contents.maglev.remove(&table);
        Ok(())
    }

    fn maglev_tables(&self) -> Result<BTreeSet<u32>, MapsError> {
        Ok(self.contents.maglev.keys().copied().collect())
    }

    fn snapshot(&self) -> Result<MapsSnapshot, MapsError> {
        Ok(MapsSnapshot { maglev: BTreeMap::new(), ..self.contents.clone() })
    }

    fn snapshot_with_maglev(&self) -> Result<MapsSnapshot, MapsError> {
        Ok(self.contents.clone())
    }
}
