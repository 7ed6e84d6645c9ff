//! Table tests of the request plan.
