"""The archive: durable vitals of every session, exactly once per (session, seq); FHIR export."""
