//! libvirt domain lifecycle events, delivered to the async side as domain UUIDs.
//!
//! The `virt` crate wraps no domain event registration, so this is the one place
//! with FFI. libvirt requires an event loop implementation registered before the
//! connection is opened, and a thread that runs it.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Once;

use tokio::sync::mpsc::UnboundedSender;
use virt::connect::Connect;
use virt::sys;

use crate::error::{Error, Result};

/// A domain started, stopped, crashed, was defined or undefined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainEvent {
    pub uuid: String,
}

static EVENT_LOOP: Once = Once::new();

/// Registers libvirt's default event loop and runs it on its own thread. Must be
/// called before any connection is opened; later calls do nothing.
pub fn start_event_loop() {
    EVENT_LOOP.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::error!(error = %e, "cannot register libvirt's event loop; lifecycle events are off");
            return;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e, "libvirt event loop iteration failed");
                    }
                }
            })
            .expect("spawning the libvirt event thread");
    });
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the Box<UnboundedSender> leaked in `subscribe` and freed only
    // by `free_sender` when libvirt drops the callback; `dom` is valid for this call.
    let sender = unsafe { &*(opaque as *const UnboundedSender<DomainEvent>) };
    let mut buf = [0 as c_char; sys::VIR_UUID_STRING_BUFLEN as usize];
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        let _ = sender.send(DomainEvent { uuid });
    }
    0
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: see `on_lifecycle`; libvirt calls this exactly once.
    drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<DomainEvent>) });
}

/// Sends every lifecycle event of `conn`'s domains to `sender`.
pub fn subscribe(conn: &Connect, sender: UnboundedSender<DomainEvent>) -> Result<()> {
    let opaque = Box::into_raw(Box::new(sender)) as *mut c_void;
    // SAFETY: libvirt calls lifecycle callbacks with the virConnectDomainEventCallback
    // signature; the generic type in the registration API is a placeholder for it.
    let callback: sys::virConnectDomainEventGenericCallback = unsafe {
        std::mem::transmute::<sys::virConnectDomainEventCallback, sys::virConnectDomainEventGenericCallback>(Some(
            on_lifecycle,
        ))
    };
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            callback,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take ownership of `opaque`.
        drop(unsafe { Box::from_raw(opaque as *mut UnboundedSender<DomainEvent>) });
        return Err(Error::Libvirt(virt::error::Error::last_error()));
    }
    Ok(())
}
