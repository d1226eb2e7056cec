"""A sample APS DB data file (``apsdb.json``) of the embedded DM, for the tests that read it."""

from __future__ import annotations

#: ESAF and proposal records in the APS DB data file, as beamline staff would export them
APS_DB = {
    "esafs": [{
        "stationName": "APSDM", "beamlineName": "25-ID-C",
        "esafId": 271828, "sector": "25", "esafTitle": "XANES of test samples",
        "description": "Samples are measured at room temperature.", "esafStatus": "Approved",
        "experimentStartDate": "2026-02-03 08:00:00", "experimentEndDate": "2026-02-06 08:00:00",
        "experimentUsers": [
            {"badge": "123456", "firstName": "Ada", "lastName": "Lovelace",
             "email": "ada@example.org", "piFlag": "Yes"},
            {"badge": "654321", "firstName": "Alan", "lastName": "Turing", "email": None,
             "piFlag": "No"}],
    }],
    "proposals": [{
        "stationName": "APSDM", "beamlineName": "25-ID-C", "runName": "2026-1",
        "id": 77777, "title": "Charge ordering in nickelates",
        "startTime": "2026-02-03T08:00:00-06:00", "endTime": "2026-02-06T08:00:00-06:00",
        "duration": 259200, "mailInFlag": "No", "proprietaryFlag": "No",
        "experimenters": [
            {"badge": "123456", "firstName": "Ada", "lastName": "Lovelace", "piFlag": "Y",
             "institution": "Analytical Engines Ltd."}],
    }],
}
