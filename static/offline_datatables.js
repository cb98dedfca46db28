window.offlineDataTablesScript = "BASE64_OF_DATATABLES";
