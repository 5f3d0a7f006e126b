//! The report service between the stand-in for OpenShell's supervisor (a static binary
//! in the guest, `openshell-sandbox-standin`) and the end-to-end test that runs its
//! server on the host's loopback. Only tests use it.

tonic::include_proto!("kiln.test.v1");
