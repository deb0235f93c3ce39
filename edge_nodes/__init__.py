"""The edge node: vitals pipeline, scoring, media, vision."""
