//! Rendered answers, kept so that a guest's repeated reads cost a lookup
//! instead of a render.
//!
//! Only the EC2 and OpenStack namespaces are cached: they hold no OS
//! parameters, so nothing private or secret is ever kept here. An instance's
//! entries remember which `Arc<Instance>` they were rendered from (by a
//! `Weak`, which does not keep the instance or its secrets alive) and the
//! day; any change to the instance makes a new `Arc`, so stale entries are
//! never served. The cache has a byte budget; when it is full, entries of
//! instances that no longer exist are swept and, if that is not enough, new
//! answers are simply not cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use cradle_model::Instance;
use uuid::Uuid;

const SHARDS: usize = 16;

/// One cached answer, with its entity tag: a hash of its bytes, taken
/// once when it is rendered, so a cached document's tag costs nothing.
#[derive(Clone)]
pub struct Doc {
    pub content_type: &'static str,
    pub body: Bytes,
    pub etag: u64,
}

impl Doc {
    pub fn new(content_type: &'static str, body: Bytes) -> Doc {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.hash(&mut h);
        Doc {
            content_type,
            body,
            etag: h.finish(),
        }
    }

    /// The `ETag` header's value.
    pub fn tag(&self) -> String {
        format!("\"{:016x}\"", self.etag)
    }
}

struct Memo {
    instance: Weak<Instance>,
    day: u64,
    docs: HashMap<Box<str>, Doc>,
    bytes: usize,
}

pub struct RenderCache {
    shards: Vec<Mutex<HashMap<Uuid, Memo>>>,
    used: AtomicUsize,
    budget: usize,
}

/// What a cached answer costs against the budget: the body and the key,
/// plus a rough allowance for the map entry.
fn cost(path: &str, body: &Bytes) -> usize {
    path.len() + body.len() + 64
}

impl RenderCache {
    pub fn new(budget: usize) -> Self {
        RenderCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            used: AtomicUsize::new(0),
            budget,
        }
    }

    fn shard(&self, id: Uuid) -> std::sync::MutexGuard<'_, HashMap<Uuid, Memo>> {
        let n = id.as_u128() as usize % SHARDS;
        self.shards[n].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(memo: &Memo, instance: &Arc<Instance>, day: u64) -> bool {
        memo.day == day && std::ptr::eq(memo.instance.as_ptr(), Arc::as_ptr(instance))
    }

    /// The cached answer for `path`, if it was rendered from this very
    /// instance on this day.
    pub fn get(&self, instance: &Arc<Instance>, day: u64, path: &str) -> Option<Doc> {
        let shard = self.shard(instance.id);
        let memo = shard.get(&instance.id)?;
        if !Self::current(memo, instance, day) {
            return None;
        }
        memo.docs.get(path).cloned()
    }

    /// Remember an answer rendered from `instance` on `day`.
    pub fn put(&self, instance: &Arc<Instance>, day: u64, path: &str, doc: Doc) {
        if self.budget == 0 {
            return;
        }
        let c = cost(path, &doc.body);
        if self.used.load(Ordering::Relaxed) + c > self.budget {
            self.sweep();
            if self.used.load(Ordering::Relaxed) + c > self.budget {
                return;
            }
        }
        let mut shard = self.shard(instance.id);
        let memo = shard.entry(instance.id).or_insert_with(|| Memo {
            instance: Arc::downgrade(instance),
            day,
            docs: HashMap::new(),
            bytes: 0,
        });
        if !Self::current(memo, instance, day) {
            self.used.fetch_sub(memo.bytes, Ordering::Relaxed);
            *memo = Memo {
                instance: Arc::downgrade(instance),
                day,
                docs: HashMap::new(),
                bytes: 0,
            };
        }
        if let Some(old) = memo.docs.insert(path.into(), doc) {
            let back = cost(path, &old.body);
            memo.bytes -= back;
            self.used.fetch_sub(back, Ordering::Relaxed);
        }
        memo.bytes += c;
        self.used.fetch_add(c, Ordering::Relaxed);
    }

    /// Drop the entries of instances that are gone or have changed since.
    fn sweep(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, memo| {
                let live = memo.instance.strong_count() > 0;
                if !live {
                    self.used.fetch_sub(memo.bytes, Ordering::Relaxed);
                }
                live
            });
        }
    }

    /// Bytes held, for tests.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cradle_model::api::InstanceSpec;

    fn instance(name: &str) -> Arc<Instance> {
        let spec = InstanceSpec {
            name: name.into(),
            metadata_address: Some("127.0.0.2".into()),
            ..Default::default()
        };
        Arc::new(
            spec.into_instance(
                Uuid::new_v4(),
                time::OffsetDateTime::UNIX_EPOCH,
                vec![0; 512],
            )
            .unwrap(),
        )
    }

    fn doc(s: &'static str) -> Doc {
        Doc::new("text/plain", Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn an_answer_is_served_only_for_the_instance_and_day_it_was_rendered_for() {
        let cache = RenderCache::new(1 << 20);
        let a = instance("a");
        cache.put(&a, 1, "/latest/meta-data/hostname", doc("a"));
        assert_eq!(
            cache.get(&a, 1, "/latest/meta-data/hostname").unwrap().body,
            "a"
        );
        assert!(
            cache.get(&a, 2, "/latest/meta-data/hostname").is_none(),
            "another day"
        );
        // A modified instance is a new Arc, even with the same id.
        let changed = Arc::new((*a).clone());
        assert!(
            cache
                .get(&changed, 1, "/latest/meta-data/hostname")
                .is_none()
        );
    }

    #[test]
    fn the_budget_bounds_the_cache_and_gone_instances_are_swept() {
        let cache = RenderCache::new(300);
        let a = instance("a");
        cache.put(&a, 1, "/x", doc("0123456789"));
        let held = cache.used();
        assert!(held > 0);
        drop(a);
        // Full: the gone instance is swept to make room.
        let b = instance("b");
        for n in 0..10 {
            cache.put(
                &b,
                1,
                &format!("/p{n}"),
                doc("0123456789012345678901234567890123456789"),
            );
        }
        assert!(cache.used() <= 300, "{}", cache.used());
        assert!(cache.get(&b, 1, "/p0").is_some());
    }
}
